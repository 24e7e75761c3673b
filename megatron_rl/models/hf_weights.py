"""Load HF safetensors weights into megatron model chunks, reading only this rank's shards.

Each parameter is assembled from the layout algebra
(:func:`megatron_rl.resharding.layout.megatron_rank_tensors` + :func:`assemble`); every
canonical run is read with ``safe_open(...).get_slice(name)[...]``, so a rank never
materialises a whole tensor it holds only a shard of. Sharded checkpoints
(``model.safetensors.index.json``) are supported.

Usage (after ``build_gpt``)::

    load_hf_into(chunks, "runs/tiny-llama")        # coordinates from megatron's parallel state
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Optional

import torch
from safetensors import safe_open
from transformers import AutoConfig

from megatron_rl.parallel.grid import LayoutError
from megatron_rl.resharding.layout import ModelShape, assemble, megatron_rank_tensors, uses_te_names


__all__ = ["load_hf_into", "hf_tensor_files", "SliceReader"]


def hf_tensor_files(hf_path: str) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of an HF checkpoint directory."""
    index = os.path.join(hf_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(hf_path, fname) for name, fname in weight_map.items()}
    single = os.path.join(hf_path, "model.safetensors")
    if not os.path.isfile(single):
        raise LayoutError(f"{hf_path}: no model.safetensors or model.safetensors.index.json; "
                          "fix: point model.hf_path at an HF checkpoint saved with safe_serialization")

    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise LayoutError(f"{single}: cannot read the safetensors header ({e}); fix: re-save or re-download it")


class SliceReader:
    """``read(canon, dim, start, length)`` over open safetensors files, slicing lazily."""

    def __init__(self, files: dict[str, str], stack: ExitStack):
        self._files = files
        self._handles = {p: stack.enter_context(safe_open(p, framework="pt")) for p in sorted(set(files.values()))}

    def __call__(self, canon: str, dim: int, start: int, length: int) -> torch.Tensor:
        if canon not in self._files:
            raise LayoutError(f"HF checkpoint has no tensor {canon!r}; fix: check the model architecture/config")
        sl = self._handles[self._files[canon]].get_slice(canon)
        index = tuple([slice(None)] * dim + [slice(start, start + length)])
        return sl[index]


def load_hf_into(chunks: list, hf_path: str, *, hf_config=None, tp: Optional[int] = None, pp: Optional[int] = None,
                 tp_rank: Optional[int] = None, pp_rank: Optional[int] = None, vocab_divisible_by: int = 128,
                 skip: tuple = ()) -> int:
    """Copy HF weights into ``chunks`` (one GPTModel chunk). Coordinates default to megatron's state.

    ``skip``: name prefixes left as built on both sides (the critic's ``("output_layer.",)``:
    its value head has no HF counterpart).

    Returns the number of parameters filled. Raises if the model's parameters and the layout
    disagree on names or shapes.
    """
    if len(chunks) != 1:
        raise NotImplementedError("load_hf_into supports one model chunk per rank (no virtual pipeline)")
    if hf_config is None:
        hf_config = AutoConfig.from_pretrained(hf_path)
    if None in (tp, pp, tp_rank, pp_rank):
        from megatron.core import parallel_state as ps  # lazy: keeps vLLM/megatron out of CLI start-up

        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    model = chunks[0]
    params = dict(_unwrap(model).named_parameters())
    te_names = uses_te_names(params)
    layout = megatron_rank_tensors(ModelShape.from_hf_config(hf_config), tp=tp, pp=pp, tp_rank=tp_rank,
                                   pp_rank=pp_rank, vocab_divisible_by=vocab_divisible_by, te_names=te_names)
    layout = {k: v for k, v in layout.items() if not k.startswith(skip)} if skip else layout
    params = {k: v for k, v in params.items() if not k.startswith(skip)} if skip else params
    if set(layout) != set(params):
        raise LayoutError(f"model parameters and layout disagree: only in model {sorted(set(params) - set(layout))}, "
                          f"only in layout {sorted(set(layout) - set(params))}")
    files = hf_tensor_files(hf_path)
    with ExitStack() as stack, torch.no_grad():
        read = SliceReader(files, stack)
        for name, lt in layout.items():
            p = params[name]
            if tuple(p.shape) != tuple(lt.shape):
                raise LayoutError(f"{name}: model shape {tuple(p.shape)} != layout shape {lt.shape}")
            p.copy_(assemble(lt, read, dtype=p.dtype, device=p.device))
    return len(layout)


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
