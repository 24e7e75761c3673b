"""Config checks that need outside facts: the launch's world size, the model's shape, the files.

One entry point, :func:`validate`, serves ``train``, ``lm-train``, the launch check and
preflight; it runs before any process group and each failure is one line
``config error: <field>: <problem>; fix: <fix>``. The divisibility rules of the degrees
(``parallel.tp/pp/cp``, ``rollout.tp``) are not restated here: these checks build the layouts
(:class:`~megatron_rl.parallel.grid.RankGrid`, ``megatron_rank_tensors`` for every (tp, pp)
position, ``vllm_rank_tensors`` for every rollout tp rank), which raise
:class:`~megatron_rl.errors.LayoutError`, and turn that into the config line::

    from megatron_rl.config import load_config, validate
    cfg = load_config("configs/tiny_cpu.yaml")
    hf_config = validate(cfg, world_size=4, load_hf=True)   # world, files, then the model
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

from transformers import AutoConfig

from megatron_rl.data.chat import check_chat_template
from megatron_rl.errors import ConfigError, LayoutError, config_error, config_error_from
from megatron_rl.models import RopeError, check_moe_parallel, rope_spec
from megatron_rl.models.shape import ModelShape
from megatron_rl.parallel.grid import RankGrid
from megatron_rl.resharding.layout import megatron_rank_tensors
from megatron_rl.resharding.vllm_layout import vllm_rank_tensors


def _fail(field_name: str, problem: str, fix: str) -> None:
    raise config_error(field_name, problem, fix)


def validate(cfg, *, world_size: int, hf_config=None, files: bool = True, load_hf: bool = False):
    """Every check, in the order a job needs them; returns the HF config checked (or None).

    ``files`` checks paths and optional packages (on every rank); ``load_hf`` reads
    ``model.hf_path``'s config.json when ``hf_config`` is not given.
    """
    check_world(cfg, world_size)
    if files:
        check_files(cfg)
    if hf_config is None and load_hf:
        hf_config = AutoConfig.from_pretrained(cfg.model.hf_path)
    if hf_config is not None:
        check_hf_config(cfg, hf_config)
    return hf_config


def check_world(cfg, world_size: int) -> None:
    """Cross-section checks that need the world size. Call before any process group."""
    p, r = cfg.parallel, cfg.rollout
    if p.world_size is not None and p.world_size != world_size:
        _fail("parallel.world_size", f"config expects {p.world_size} ranks but the launch has {world_size}",
              f"launch {p.world_size} processes (NNODES x NPROC_PER_NODE) or set parallel.world_size={world_size}")
    try:
        RankGrid(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep).check_rollout_tp(r.tp)
    except LayoutError as e:
        raise config_error_from(e, field_name="parallel", fix="choose degrees that divide the world size") from None
    # Every DP rank must train the same number of groups per optimizer step, or the
    # gradient all-reduce of one rank waits for a micro-batch another never runs.
    dp, a = cfg.data_parallel_size(world_size), cfg.algorithm
    if cfg.data.prompts_per_step % (dp * a.mini_batches):
        _fail("data.prompts_per_step", f"{cfg.data.prompts_per_step} groups do not split evenly over "
              f"data-parallel size {dp} x algorithm.mini_batches {a.mini_batches}",
              f"use a multiple of {dp * a.mini_batches}")


def check_model(cfg, *, num_attention_heads: int, num_key_value_heads: int, vocab_size: int, num_layers: int,
                max_position_embeddings: Optional[int] = None, hidden_size: Optional[int] = None,
                intermediate_size: Optional[int] = None, head_dim: Optional[int] = None,
                moe: Optional[MoeShape] = None) -> None:
    """Checks that need the model's shape: both frameworks' layouts of it must exist.

    Sizes a caller does not know (``hidden_size``, ``intermediate_size``, ``head_dim``) get
    neutral stand-ins that every degree divides. ``moe`` (None: dense) decides ``parallel.ep``.
    """
    p, r = cfg.parallel, cfg.rollout
    if max_position_embeddings is not None and r.max_model_len > max_position_embeddings:
        _fail("rollout.max_model_len", f"{r.max_model_len} exceeds the model's max_position_embeddings="
              f"{max_position_embeddings}", f"set rollout.max_model_len <= {max_position_embeddings}")
    if vocab_size < 1:
        _fail("model.hf_path", f"vocab_size={vocab_size}", "point model.hf_path at a valid HF model")
    neutral = math.lcm(p.tp, r.tp)
    shape = ModelShape(hidden=hidden_size or 1, heads=num_attention_heads, kv_heads=num_key_value_heads,
                       head_dim=head_dim or 1, ffn=intermediate_size or neutral, layers=num_layers, vocab=vocab_size,
                       moe=moe)
    try:
        if moe is not None:
            check_moe_parallel(p)
        for pp_rank in range(p.pp):
            for tp_rank in range(p.tp):
                megatron_rank_tensors(shape, tp=p.tp, pp=p.pp, tp_rank=tp_rank, pp_rank=pp_rank, ep=p.ep,
                                      vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
        for tp_rank in range(r.tp):
            vllm_rank_tensors(shape, tp=r.tp, tp_rank=tp_rank)
    except LayoutError as e:
        raise config_error_from(e, field_name="model.hf_path", fix="choose degrees that fit the model") from None


def check_hf_config(cfg, hf_config) -> None:
    """:func:`check_model` with the shape read from a transformers config object, its RoPE and
    (when it names one) its architecture."""
    moe = None
    try:
        rope_spec(hf_config)
        if getattr(hf_config, "architectures", None):
            moe = ModelShape.from_hf_config(hf_config).moe  # refuses an unsupported architecture
    except RopeError as e:
        _fail("model.hf_path", f"{cfg.model.hf_path} config.json: {e.problem}", e.fix)
    except LayoutError as e:
        problem, _, fix = str(e).partition("; fix: ")
        _fail("model.hf_path", f"{cfg.model.hf_path} config.json: {problem}", fix or "use a supported model")
    if moe is None and (cfg.algorithm.routing_replay or cfg.logging.route_mismatch):
        key = "algorithm.routing_replay" if cfg.algorithm.routing_replay else "logging.route_mismatch"
        _fail(key, f"needs an MoE model; {cfg.model.hf_path} is dense", f"set {key}=false")
    heads = hf_config.num_attention_heads
    check_model(cfg, num_attention_heads=heads,
                num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
                vocab_size=hf_config.vocab_size, num_layers=hf_config.num_hidden_layers,
                max_position_embeddings=getattr(hf_config, "max_position_embeddings", None),
                hidden_size=getattr(hf_config, "hidden_size", None),
                intermediate_size=getattr(hf_config, "intermediate_size", None),
                head_dim=getattr(hf_config, "head_dim", None), moe=moe)


def check_files(cfg) -> None:
    """Checks on the filesystem and installed packages. Call on every rank before any process group."""
    if not os.path.isfile(os.path.join(cfg.model.hf_path, "config.json")):
        _fail("model.hf_path", f"{cfg.model.hf_path!r} holds no config.json",
              "point it at a HF model directory (for the tiny demo: megatron-rl make-tiny-model --out "
              f"{cfg.model.hf_path})")
    if cfg.data.chat_template:
        check_chat_template(cfg.model.hf_path)
    ref = cfg.algorithm.ref_hf_path
    if cfg.algorithm.kl_coef > 0 and ref and not os.path.isfile(os.path.join(ref, "config.json")):
        _fail("algorithm.ref_hf_path", f"{ref!r} holds no config.json",
              "point it at a HF model directory with the policy's architecture, or unset it to use model.hf_path")
    critic = cfg.algorithm.critic_hf_path
    if critic and not os.path.isfile(os.path.join(critic, "config.json")):
        _fail("algorithm.critic_hf_path", f"{critic!r} holds no config.json",
              "point it at a HF model directory with the policy's architecture, or unset it to use model.hf_path")
    for key in ("dataset", "eval_dataset"):
        _check_dataset_file(f"data.{key}", getattr(cfg.data, key))


def _check_dataset_file(key: str, ds) -> None:
    if ds is None or ds.startswith("synthetic:"):
        return
    if not os.path.isfile(ds):
        _fail(key, f"file {ds!r} does not exist", f"point {key} at an existing .jsonl/.parquet file, or use "
              "synthetic:<task>")
    if ds.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
        _fail(key, f"reading {ds} needs pyarrow, which is not installed",
              "pip install pyarrow==26.0.1 (or megatron_rl[data]), or convert the file to .jsonl")


__all__ = ["ConfigError", "validate", "check_world", "check_model", "check_hf_config", "check_files"]
