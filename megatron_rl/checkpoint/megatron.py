"""Megatron checkpoints: megatron-core dist-checkpointing plus our metadata, and canonical streaming.

A Megatron checkpoint directory written by :mod:`megatron_rl.checkpoint.convert` holds

- the megatron-core ``dist_checkpointing`` files (torch_dist backend: ``metadata.json``,
  ``common.pt``, ``*.distcp``), keyed by megatron-core's sharded state dict (TE names, layers
  stacked); megatron-core itself can load them at any TP/PP;
- ``megatron_rl.json``: the layout it was saved at, the padded vocab, the parameter dtype,
  the tool's versions, and the HF dtype to convert back to;
- ``hf/``: the source model's ``config.json``, generation config and tokenizer files, so the
  way back to HF needs nothing else.

The model side: :func:`save_model` / :func:`load_model` (dist-checkpointing, collective), and
:func:`load_hf_into`, which fills a model's own shard from an HF checkpoint through the layout
algebra, reading only that shard's slices (the one HF reader, :class:`~.hf.HFCheckpoint`).
Moving weights *between* ranks (export to HF, reshard, live sync) is a plan run by
:func:`megatron_rl.resharding.executor.run_plan`; nothing here moves bytes between ranks.

Usage (every rank, under torchrun)::

    load_hf_into(chunks, "runs/tiny-llama", topo=topo)   # this rank's shard, from HF slices
    load_model(model, ckpt_dir)                          # or from a dist checkpoint
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_rl.checkpoint import CheckpointError
from megatron_rl.checkpoint.hf import HFCheckpoint, _load_config, open_hf
from megatron_rl.errors import LayoutError
from megatron_rl.parallel.topology import Topology, model_shard
from megatron_rl.resharding.layout import LocalTensor, ModelShape, assemble, megatron_rank_tensors, padded_vocab, \
    uses_te_names


META = "megatron_rl.json"
HF_SUBDIR = "hf"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MegatronMeta:
    """What ``megatron_rl.json`` records beside a dist checkpoint."""

    tp: int
    pp: int
    vocab_divisible_by: int
    padded_vocab: int
    param_dtype: str
    hf_dtype: str
    shape: dict
    versions: dict
    format_version: int = FORMAT_VERSION

    @property
    def model_shape(self) -> ModelShape:
        return ModelShape(**self.shape)


def versions() -> dict:
    import importlib.metadata as md  # lazy: only when a checkpoint's metadata is written

    out = {}
    for pkg in ("megatron_rl", "megatron-core", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def write_meta(ckpt_dir: str, meta: MegatronMeta) -> None:
    with open(os.path.join(ckpt_dir, META), "w") as f:
        json.dump(asdict(meta), f, indent=2, sort_keys=True)
        f.write("\n")


def read_meta(ckpt_dir: str) -> MegatronMeta:
    """Validate a Megatron checkpoint directory (complete, ours, readable) and return its metadata."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: Megatron checkpoint directory does not exist; "
                              "fix: pass a directory written by `megatron-rl convert hf-to-megatron`")
    path = os.path.join(ckpt_dir, META)
    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")) or not os.path.isfile(path):
        missing = "metadata.json" if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")) else META
        raise CheckpointError(f"{os.path.join(ckpt_dir, missing)}: missing, the checkpoint is incomplete "
                              "(half-written or not a megatron_rl checkpoint); fix: convert it again")
    try:
        with open(path) as f:
            raw = json.load(f)
        meta = MegatronMeta(**raw)
        meta.model_shape  # noqa: B018 - validates the shape fields
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt metadata ({str(e).splitlines()[0]}); "
                              "fix: restore it or convert the checkpoint again") from None
    if meta.format_version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.format_version} is newer than this tool "
                              f"({FORMAT_VERSION}); fix: upgrade megatron_rl")
    for f in os.listdir(ckpt_dir):
        if f.endswith(".distcp") and os.path.getsize(os.path.join(ckpt_dir, f)) == 0:
            raise CheckpointError(f"{os.path.join(ckpt_dir, f)}: empty shard file, the checkpoint is "
                                  "incomplete; fix: convert it again")
    if not os.path.isfile(os.path.join(ckpt_dir, HF_SUBDIR, "config.json")):
        raise CheckpointError(f"{os.path.join(ckpt_dir, HF_SUBDIR, 'config.json')}: missing; "
                              "fix: copy the source model's config.json and tokenizer files into it")
    return meta


def plain_meta(ckpt_dir: str, *, hf_dir: str, tp: int = 1, pp: int = 1, vocab_divisible_by: int = 128,
               param_dtype: Optional[str] = None) -> MegatronMeta:
    """Metadata for a plain megatron-core dist checkpoint (saved by another job) from its HF config.

    Its global tensors do not depend on the saved layout, so ``tp``/``pp`` only pick the layout
    to load it at. ``param_dtype``: the dtype it was saved in (default: the HF config's).
    """

    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise CheckpointError(f"{os.path.join(ckpt_dir, 'metadata.json')}: missing, not a complete megatron-core "
                              "dist checkpoint; fix: pass the directory dist_checkpointing.save wrote")
    cfg = _load_config(hf_dir)
    shape = ModelShape.from_hf_config(cfg)
    dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32").replace("torch.", "")
    return MegatronMeta(tp=tp, pp=pp, vocab_divisible_by=vocab_divisible_by, param_dtype=param_dtype or dtype,
                        hf_dtype=dtype,
                        padded_vocab=padded_vocab(shape.vocab, divisible_by=vocab_divisible_by, tp=tp),
                        shape=dict(shape.__dict__), versions={})


# ---------------------------------------------------------------------------------------------
# The model side.


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def local_params(model) -> dict[str, torch.Tensor]:
    """This rank's parameters by their megatron-core names (wrappers removed)."""
    return dict(unwrap(model).named_parameters())


def check_names(local: dict, params: dict, *, rank: int) -> None:
    """The layout and the built model must name the same tensors with the same shapes."""
    if set(local) != set(params):
        extra, missing = sorted(set(params) - set(local)), sorted(set(local) - set(params))
        raise RuntimeError(f"rank {rank}: layout and model disagree: model-only {extra[:4]}, layout-only {missing[:4]}")
    for n, lt in local.items():
        if tuple(params[n].shape) != tuple(lt.shape):
            raise RuntimeError(f"rank {rank}: {n} has shape {tuple(params[n].shape)}, layout says {lt.shape}")


def save_model(model, ckpt_dir: str) -> None:
    """Save this rank's part of ``model`` into ``ckpt_dir`` with dist-checkpointing (collective)."""
    from megatron.core import dist_checkpointing  # lazy: keeps vLLM/megatron out of CLI start-up

    dist_checkpointing.save(unwrap(model).sharded_state_dict(), ckpt_dir)


def load_model(model, ckpt_dir: str, *, key: Optional[str] = None) -> None:
    """Load ``ckpt_dir`` into ``model`` at the model's own layout (collective; strict).

    ``key``: the checkpoint holds the model under that key beside other state (``"model"`` in an
    RL checkpoint and in Megatron-LM's, next to ``"optimizer"``, which is then not read).
    """
    from megatron.core import dist_checkpointing  # lazy: keeps vLLM/megatron out of CLI start-up

    m = unwrap(model)
    state = dist_checkpointing.load({key: m.sharded_state_dict()} if key else m.sharded_state_dict(), ckpt_dir)
    state = state[key] if key else state
    missing, unexpected = m.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); fix: convert from the matching HF model")


def fill_local(params: dict[str, torch.Tensor], local: dict[str, LocalTensor], ckpt: HFCheckpoint, *,
               wrap: Callable = iter) -> int:
    """Copy every local tensor in ``local`` into ``params`` from HF slices (``assemble`` over
    ``ckpt.read``); ``wrap`` wraps the item iterator (a progress bar). Returns the count."""
    with torch.no_grad():
        for name, lt in wrap(local.items()):
            p = params[name]
            p.copy_(assemble(lt, ckpt.read, dtype=p.dtype, device=p.device))
    return len(local)


def load_hf_into(chunks: list, hf_path: str, *, topo: Optional[Topology] = None, hf_config=None,
                 vocab_divisible_by: int = 128, skip: tuple = ()) -> int:
    """Copy HF weights into ``chunks`` (one GPTModel chunk), reading only this rank's slices.

    The shard comes from ``topo`` (or, without one, from the model's own process groups).
    ``skip``: name prefixes left as built on both sides (the critic's ``("output_layer.",)``: its
    value head has no HF counterpart).
    Returns the number of parameters filled; raises when the model and the layout disagree.
    """
    if len(chunks) != 1:
        raise NotImplementedError("load_hf_into supports one model chunk per rank (no virtual pipeline)")
    model = chunks[0]
    ckpt = open_hf(hf_path, tokenizer_check=False)
    shape = ModelShape.from_hf_config(hf_config) if hf_config is not None else ckpt.shape
    params = local_params(model)
    c = topo.shard if topo is not None else model_shard(model)
    local = megatron_rank_tensors(shape, tp=c.tp, pp=c.pp, tp_rank=c.tp_rank, pp_rank=c.pp_rank, ep=c.ep,
                                  ep_rank=c.ep_rank, vocab_divisible_by=vocab_divisible_by,
                                  te_names=uses_te_names(params))
    if skip:
        local = {k: v for k, v in local.items() if not k.startswith(skip)}
        params = {k: v for k, v in params.items() if not k.startswith(skip)}
    try:
        check_names(local, params, rank=dist.get_rank())
    except RuntimeError as e:
        raise LayoutError(str(e)) from None
    return fill_local(params, local, ckpt)
