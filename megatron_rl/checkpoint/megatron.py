"""Megatron checkpoints: megatron-core dist-checkpointing plus our metadata, and canonical streaming.

A Megatron checkpoint directory written by :mod:`megatron_rl.checkpoint.convert` holds

- the megatron-core ``dist_checkpointing`` files (torch_dist backend: ``metadata.json``,
  ``common.pt``, ``*.distcp``), keyed by megatron-core's sharded state dict (TE names, layers
  stacked); megatron-core itself can load them at any TP/PP;
- ``megatron_rl.json``: the layout it was saved at, the padded vocab, the parameter dtype,
  the tool's versions, and the HF dtype to convert back to;
- ``hf/``: the source model's ``config.json``, generation config and tokenizer files, so the
  way back to HF needs nothing else.

:func:`canonical_pieces` (pure) picks, for every canonical tensor, one source rank per region
from a :class:`~megatron_rl.resharding.layout.Layout`; :func:`stream_canonical` moves one
canonical tensor at a time to the writer rank with point-to-point sends, so no rank ever holds
more than its own shard plus one canonical tensor.

Usage (every rank, under torchrun)::

    load_model(model, ckpt_dir)
    for name, full in stream_canonical(layout, local_params(model), rank=rank, dst=0):
        if rank == 0: writer.write(name, full)
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch

from megatron_rl.checkpoint import CheckpointError
from megatron_rl.checkpoint.hf import _load_config
from megatron_rl.parallel import collectives as coll
from megatron_rl.resharding.layout import Block, Layout, ModelShape, padded_vocab


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
    import importlib.metadata as md

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


def plain_meta(ckpt_dir: str, *, hf_dir: str, tp: int = 1, pp: int = 1, vocab_divisible_by: int = 128) -> MegatronMeta:
    """Metadata for a plain megatron-core dist checkpoint (saved by another job) from its HF config.

    Its global tensors do not depend on the saved layout, so ``tp``/``pp`` only pick the layout
    to load it at.
    """

    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise CheckpointError(f"{os.path.join(ckpt_dir, 'metadata.json')}: missing, not a complete megatron-core "
                              "dist checkpoint; fix: pass the directory dist_checkpointing.save wrote")
    cfg = _load_config(hf_dir)
    shape = ModelShape.from_hf_config(cfg)
    dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32").replace("torch.", "")
    return MegatronMeta(tp=tp, pp=pp, vocab_divisible_by=vocab_divisible_by, param_dtype=dtype, hf_dtype=dtype,
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


def load_model(model, ckpt_dir: str) -> None:
    """Load ``ckpt_dir`` into ``model`` at the model's own layout (collective; strict)."""
    from megatron.core import dist_checkpointing  # lazy: keeps vLLM/megatron out of CLI start-up

    m = unwrap(model)
    state = dist_checkpointing.load(m.sharded_state_dict(), ckpt_dir)
    missing, unexpected = m.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); fix: convert from the matching HF model")


# ---------------------------------------------------------------------------------------------
# Canonical streaming.


@dataclass(frozen=True)
class Piece:
    """Region ``block`` of canonical tensor, held by ``rank`` in local tensor ``local`` along ``dim``."""

    rank: int
    local: str
    dim: int
    block: Block


def canonical_pieces(layout: Layout) -> dict[str, list[Piece]]:
    """For every canonical tensor, one source per region (the lowest rank that holds it).

    Replicas (TP-replicated norms, the tied embedding's last-stage copy, DP/CP copies) are
    dropped; the chosen regions must tile the canonical tensor exactly, or this raises.
    """
    out: dict[str, list[Piece]] = {n: [] for n in layout.canon_shapes}
    seen: dict[str, set] = {n: set() for n in layout.canon_shapes}
    for rank in sorted(layout.ranks):
        for lt in layout.ranks[rank].values():
            for b in lt.blocks:
                key = (lt.dim, b.canon_start, b.length)
                if key not in seen[b.canon]:
                    seen[b.canon].add(key)
                    out[b.canon].append(Piece(rank, lt.name, lt.dim, b))
    for name, pieces in out.items():
        size = layout.canon_shapes[name]
        dims = {p.dim for p in pieces}
        cover = sorted((p.block.canon_start, p.block.length) for p in pieces)
        pos = 0
        for start, length in cover:
            if start != pos:
                break
            pos += length
        if len(dims) != 1 or pos != size[dims.pop()]:
            raise RuntimeError(f"layout does not tile canonical tensor {name} exactly: {cover}")
    return out


def stream_canonical(layout: Layout, params: dict[str, torch.Tensor], *, rank: int, dst: int = 0,
                     names: Optional[list[str]] = None, group=None) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """Yield ``(name, full_tensor)`` per canonical tensor on ``dst`` (``(name, None)`` elsewhere).

    Collective over the world: every rank must iterate it to the end, in the same order.
    """
    pieces = canonical_pieces(layout)
    shapes = layout.canon_shapes
    for name in names or list(shapes):
        mine = [p for p in pieces[name] if p.rank == rank]
        if rank != dst:
            reqs = [coll.isend(params[p.local].detach().narrow(p.dim, p.block.local_start, p.block.length).contiguous(),
                               dst=dst, group=group) for p in mine]
            for r in reqs:
                r.wait()
            yield name, None
            continue
        dtype = next(iter(params.values())).dtype if params else torch.float32
        device = coll.backend_device(group)  # NCCL: receive on the GPU like the senders
        full = torch.empty(shapes[name], dtype=dtype, device=device)
        reqs, bufs = [], []
        for p in pieces[name]:
            region = full.narrow(p.dim, p.block.canon_start, p.block.length)
            if p.rank == rank:
                region.copy_(params[p.local].detach().narrow(p.dim, p.block.local_start, p.block.length))
            else:
                buf = torch.empty(region.shape, dtype=dtype, device=device)
                reqs.append(coll.irecv(buf, src=p.rank, group=group))
                bufs.append((region, buf))
        for r in reqs:
            r.wait()
        for region, buf in bufs:
            region.copy_(buf)
        yield name, full.cpu()  # the writer takes host tensors (a no-op on CPU)
