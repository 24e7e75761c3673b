"""Tier 1: the facts the CUDA rollout of an MoE model rests on, read from the installed vLLM.

The weight sync writes each expert's shard in place into vLLM's stacked ``w13_weight[j]``
(``[gate; up]``) and ``w2_weight[j]``. On CUDA that is only right for an experts backend whose
runtime format is the checkpoint's, so the engine pins ``moe_backend="triton"``
(``vllm_compat.moe_engine_kwargs``). These checks run vLLM's own code on CPU and fail if the
installed vLLM moves: the Triton conversion must leave both stacks as loaded, "triton" must name
that backend and be an engine argument, and (the negative control) the FlashInfer CUTLASS
conversion must reorder w13, which is why the backend is pinned at all."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.unit


def _stacks():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 2 * 6, 8, generator=g), torch.randn(4, 8, 6, generator=g)  # E=4, I=6, H=8


def test_engine_pins_triton_for_moe_on_cuda_only():
    from megatron_rl.compat.vllm_compat import moe_engine_kwargs

    assert moe_engine_kwargs(moe=True, cuda=True) == {"moe_backend": "triton"}
    assert moe_engine_kwargs(moe=True, cuda=False) == {} and moe_engine_kwargs(moe=False, cuda=True) == {}


def test_triton_runtime_format_is_the_checkpoint_format():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
        UnquantizedMoeBackend, convert_to_unquantized_kernel_format, map_unquantized_backend)

    from megatron_rl.compat.vllm_compat import SYNC_MOE_BACKEND

    assert "moe_backend" in {f.name for f in dataclasses.fields(EngineArgs)}
    assert map_unquantized_backend(SYNC_MOE_BACKEND) == UnquantizedMoeBackend.TRITON
    w13, w2 = _stacks()
    cfg = SimpleNamespace(is_act_and_mul=True)
    a, b = convert_to_unquantized_kernel_format(UnquantizedMoeBackend.TRITON, moe_config=cfg,
                                                w13_weight=w13.clone(), w2_weight=w2.clone())
    assert torch.equal(a, w13) and torch.equal(b, w2)
    # negative control: the backend vLLM prefers off Hopper reorders [gate; up] to [up; gate]
    c, _ = convert_to_unquantized_kernel_format(UnquantizedMoeBackend.FLASHINFER_CUTLASS, moe_config=cfg,
                                                w13_weight=w13.clone(), w2_weight=w2.clone())
    assert not torch.equal(c, w13)
    assert torch.equal(c[:, :6], w13[:, 6:]) and torch.equal(c[:, 6:], w13[:, :6])


def test_engine_reads_moe_from_the_model_config(tmp_path):
    from megatron_rl.models.tiny import tiny_hf_config
    from megatron_rl.rollout.vllm_engine import _is_moe

    for family, moe in (("qwen3_moe", True), ("qwen3", False)):
        tiny_hf_config(family).save_pretrained(str(tmp_path / family))
        assert _is_moe(str(tmp_path / family)) is moe
