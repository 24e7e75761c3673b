"""The per-rank part of conversion: collective functions, called on every rank under torchrun.

:func:`hf_to_megatron` builds megatron-core's parallel state and this rank's model, fills each
local tensor from HF slices through the layout algebra and saves a dist checkpoint;
:func:`megatron_to_hf` loads a dist checkpoint at its saved layout and streams canonical tensors
to rank 0, which writes safetensors. Both write into a directory the caller owns and leave the
process group up (megatron's parallel state is torn down), so one process can run many
conversions in turn; the world may hold DP replicas of the layout (world = k * TP * PP).
:func:`convert` adds the atomic output: rank 0 creates the temporary sibling, every rank writes
into it, and rank 0 renames it once all ranks are done.

Training jobs use :func:`save_checkpoint` / :func:`load_checkpoint` on their own model chunk.

Usage (every rank)::

    convert("hf-to-megatron", src="runs/tiny-llama", out="runs/llama-tp2pp2", tp=2, pp=2)
    meta = load_checkpoint(chunk, "runs/llama-tp2pp2")      # any layout: dist-ckpt reshards on load
    save_checkpoint(chunk, "runs/llama-trained", hf_dir="runs/llama-tp2pp2/hf")
"""
from __future__ import annotations

import os
import shutil
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from transformers import AutoConfig

from megatron_rl.checkpoint import hf as hfio
from megatron_rl.checkpoint import megatron as mio
from megatron_rl.checkpoint import publish
from megatron_rl.config import ParallelConfig
from megatron_rl.models import build_gpt
from megatron_rl.parallel import collectives as coll
from megatron_rl.parallel import destroy_distributed, init_distributed
from megatron_rl.resharding.layout import ModelShape, assemble, megatron_layout, padded_vocab, uses_te_names


STAGE = ".canonical"  # reshard's staging HF directory, inside the temporary output


def _progress(it, *, show: bool, desc: str, total=None):
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, unit="tensor", disable=not show or dist.get_rank() != 0, leave=False)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _config_dtype(cfg, fallback: torch.dtype) -> str:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return _dtype_name(d) if d is not None else _dtype_name(fallback)


def setup_model(hf_config, *, tp: int, pp: int, dtype: torch.dtype, vocab_divisible_by: int):
    """Parallel state + this rank's model + the layout (checked against the model's parameters)."""

    parallel = ParallelConfig(tp=tp, pp=pp)
    grid = init_distributed(parallel).grid  # the Topology's training grid
    (model,) = build_gpt(hf_config, parallel=parallel, dtype=dtype, vocab_divisible_by=vocab_divisible_by)
    params = mio.local_params(model)
    te_names = uses_te_names(params)
    layout = megatron_layout(ModelShape.from_hf_config(hf_config), grid, vocab_divisible_by=vocab_divisible_by,
                             te_names=te_names)
    rank = dist.get_rank()
    mio.check_names(layout.local(rank), params, rank=rank)
    return model, params, layout


def fill_from_hf(params: dict, layout, ckpt: hfio.HFCheckpoint, *, progress: bool = False) -> None:
    """Copy this rank's local tensors from HF slices (``assemble`` over ``ckpt.read``)."""
    local = layout.local(dist.get_rank())
    with torch.no_grad():
        for name, lt in _progress(local.items(), show=progress, desc="hf->megatron", total=len(local)):
            params[name].copy_(assemble(lt, ckpt.read, dtype=params[name].dtype))


def save_checkpoint(model, out: str, *, hf_dir: str, vocab_divisible_by: int = 128, overwrite: bool = False,
                    tmp: Optional[str] = None) -> None:
    """Save ``model`` (this rank's chunk, current parallel state) as a megatron_rl checkpoint (collective).

    Writes the dist checkpoint, ``megatron_rl.json`` and ``hf/`` (config + tokenizer copied from
    ``hf_dir``) into a temporary sibling of ``out`` and renames it when every rank is done;
    with ``tmp`` given, writes there and leaves publishing to the caller.
    """
    from megatron.core import parallel_state as ps  # lazy: keeps vLLM/megatron out of CLI start-up

    def work(path):
        mio.save_model(model, path)
        if dist.get_rank() == 0:
            os.makedirs(os.path.join(path, mio.HF_SUBDIR), exist_ok=True)
            hfio.copy_hf_extras(hf_dir, os.path.join(path, mio.HF_SUBDIR))
            cfg = AutoConfig.from_pretrained(hf_dir)
            shape = ModelShape.from_hf_config(cfg)
            tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
            dtype = next(iter(mio.local_params(model).values())).dtype
            mio.write_meta(path, mio.MegatronMeta(
                tp=tp, pp=pp, vocab_divisible_by=vocab_divisible_by,
                padded_vocab=padded_vocab(shape.vocab, divisible_by=vocab_divisible_by, tp=tp),
                param_dtype=_dtype_name(dtype), hf_dtype=_config_dtype(cfg, dtype),
                shape=dict(shape.__dict__), versions=mio.versions()))
        coll.barrier()

    if tmp is not None:
        work(tmp)
    else:
        publish.atomic_collective(out, work, overwrite=overwrite)


def load_checkpoint(model, ckpt_dir: str) -> mio.MegatronMeta:
    """Load a megatron_rl checkpoint into ``model`` at the current layout (collective; strict).

    The saved layout need not match: megatron-core's dist-checkpointing reshards on load
    (the padded vocab does not depend on TP). Returns the checkpoint's metadata.
    """
    meta = mio.read_meta(ckpt_dir)
    mio.load_model(model, ckpt_dir)
    return meta


def hf_to_megatron(src: str, tmp: str, *, tp: int, pp: int, vocab_divisible_by: int = 128,
                   param_dtype: Optional[str] = None, progress: bool = False) -> None:
    """HF directory ``src`` -> dist checkpoint + metadata in ``tmp`` (collective)."""

    ckpt = hfio.open_hf(src)
    dtype = hfio.torch_dtype(param_dtype) if param_dtype else ckpt.dtype
    model, params, layout = setup_model(ckpt.config, tp=tp, pp=pp, dtype=dtype, vocab_divisible_by=vocab_divisible_by)
    fill_from_hf(params, layout, ckpt, progress=progress)
    save_checkpoint(model, tmp, hf_dir=ckpt.path, vocab_divisible_by=vocab_divisible_by, tmp=tmp)
    destroy_distributed(keep_process_group=True)


def load_megatron(src: str, *, tp: Optional[int] = None, pp: Optional[int] = None, hf_dir: Optional[str] = None,
                  vocab_divisible_by: int = 128):
    """Parallel state + model with checkpoint ``src`` loaded (collective); layout defaults to the saved one.

    ``hf_dir`` marks ``src`` as a plain megatron-core dist checkpoint (no megatron_rl.json):
    the model comes from that HF config, at ``tp``/``pp`` (default 1/1).
    """

    if hf_dir is None:
        meta = mio.read_meta(src)
        hf_dir = os.path.join(os.path.abspath(src), mio.HF_SUBDIR)
    else:
        meta = mio.plain_meta(src, hf_dir=hf_dir, tp=tp or 1, pp=pp or 1, vocab_divisible_by=vocab_divisible_by)
    model, params, layout = setup_model(AutoConfig.from_pretrained(hf_dir), tp=tp or meta.tp, pp=pp or meta.pp,
                                        dtype=hfio.torch_dtype(meta.param_dtype),
                                        vocab_divisible_by=meta.vocab_divisible_by)
    mio.load_model(model, src)
    return meta, model, params, layout


def write_hf(params: dict, layout, tmp: str, *, hf_dir: str, dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30,
             progress: bool = False) -> None:
    """Stream canonical tensors to rank 0 and write HF safetensors + config/tokenizer into ``tmp`` (collective)."""
    rank = dist.get_rank()
    writer = None
    if rank == 0:
        writer = hfio.SafetensorsStreamWriter(tmp, shapes=layout.canon_shapes, max_shard_bytes=max_shard_bytes,
                                              dtype=dtype)
    stream = mio.stream_canonical(layout, params, rank=rank, dst=0)
    for name, full in _progress(stream, show=progress, desc="megatron->hf", total=len(layout.canon_shapes)):
        if writer is not None:
            writer.write(name, full)
    if writer is not None:
        writer.close()
        hfio.copy_hf_extras(hf_dir, tmp)
    coll.barrier()


def megatron_to_hf(src: str, tmp: str, *, dtype: Optional[str] = None, max_shard_bytes: int = 5 * 2**30,
                   hf_dir: Optional[str] = None, tp: Optional[int] = None, pp: Optional[int] = None,
                   vocab_divisible_by: int = 128, progress: bool = False) -> None:
    """Dist checkpoint ``src`` -> HF safetensors + config + tokenizer in ``tmp`` (collective).

    ``hf_dir``/``tp``/``pp``/``vocab_divisible_by``: for a plain dist checkpoint, see :func:`load_megatron`.
    """

    meta, model, params, layout = load_megatron(src, hf_dir=hf_dir, tp=tp, pp=pp, vocab_divisible_by=vocab_divisible_by)
    write_hf(params, layout, tmp, hf_dir=hf_dir or os.path.join(os.path.abspath(src), mio.HF_SUBDIR),
             dtype=hfio.torch_dtype(dtype or meta.hf_dtype), max_shard_bytes=max_shard_bytes, progress=progress)
    destroy_distributed(keep_process_group=True)


def reshard(src: str, tmp: str, *, tp: int, pp: int, progress: bool = False) -> None:
    """Megatron ``src`` -> canonical safetensors (staged in ``tmp``) -> Megatron(tp, pp) in ``tmp``.

    The world must hold whole replicas of both layouts. The CLI instead runs the two halves
    as two torchrun launches sized to each layout.
    """
    meta = mio.read_meta(src)
    stage = os.path.join(tmp, STAGE)
    if dist.get_rank() == 0:
        os.makedirs(stage)
    coll.barrier()
    megatron_to_hf(src, stage, dtype=meta.param_dtype, progress=progress)
    hf_to_megatron(stage, tmp, tp=tp, pp=pp, vocab_divisible_by=meta.vocab_divisible_by, progress=progress)
    if dist.get_rank() == 0:
        shutil.rmtree(stage)
    coll.barrier()


def ensure_process_group(timeout_s: float = 300.0) -> None:
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def convert(mode: str, *, src: str, out: str, overwrite: bool = False, tmp: Optional[str] = None, **kw) -> None:
    """Run ``mode`` on every rank into an atomic output (``tmp`` given: the caller publishes it)."""
    ensure_process_group()
    work = {"hf-to-megatron": hf_to_megatron, "megatron-to-hf": megatron_to_hf, "reshard": reshard}[mode]
    if tmp is not None:
        work(src, tmp, **kw)
    else:
        publish.atomic_collective(out, lambda path: work(src, path, **kw), overwrite=overwrite)
