"""The per-rank part of conversion: collective functions, called on every rank under torchrun.

:func:`hf_to_megatron` builds megatron-core's parallel state and this rank's model, fills each
local tensor from HF slices through the layout algebra and saves a dist checkpoint.
:func:`megatron_to_hf` loads a dist checkpoint at its saved layout and runs the plan from that
layout to :func:`~megatron_rl.resharding.layout.hf_layout` (every tensor whole, on rank 0) with
the same executor as live weight sync, into :class:`~.hf.SafetensorsStreamWriter` on rank 0:
bounded buckets, and ``verify`` checks every slice's checksum. :func:`reshard` runs the plan
from the saved layout to the new one through that executor and saves the new model.

Reshard is a plan, not dist-checkpointing's reshard-on-load. Loading at another layout
(:func:`load_checkpoint`, RL resume) still lets megatron-core reshard, but a reshard *command*
is a move between two layouts, and the plan makes it the same move as export and live sync:
one implementation of moving weight bytes between layouts, its bucket bound, its ``verify``
checksums and its tests (bytes moved equal the planner's lower bound). It runs in one torchrun
of lcm(a, b) ranks (whole replicas of both layouts), with no HF copy staged on disk.

All write into a directory the caller owns and leave the process group up (megatron's parallel
state is torn down), so one process can run many conversions in turn; the world may hold DP
replicas of the layouts. :func:`convert` adds the atomic output: rank 0 creates the temporary
sibling, every rank writes into it, and rank 0 renames it once all ranks are done.

Training jobs use :func:`save_checkpoint` / :func:`load_checkpoint` on their own model chunk.

Usage (every rank)::

    convert("hf-to-megatron", src="runs/tiny-llama", out="runs/llama-tp2pp2", tp=2, pp=2)
    convert("reshard", src="runs/llama-tp2pp2", out="runs/llama-tp1pp1", tp=1, pp=1, verify=True)
    meta = load_checkpoint(chunk, "runs/llama-tp2pp2")      # any layout: dist-ckpt reshards on load
    save_checkpoint(chunk, "runs/llama-trained", hf_dir="runs/llama-tp2pp2/hf")
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
from transformers import AutoConfig

from megatron_rl.checkpoint import hf as hfio
from megatron_rl.checkpoint import megatron as mio
from megatron_rl.checkpoint import publish
from megatron_rl.config import ParallelConfig, SyncConfig
from megatron_rl.models import build_gpt
from megatron_rl.parallel import collectives as coll
from megatron_rl.parallel import destroy_distributed, init_distributed
from megatron_rl.parallel.topology import model_shard
from megatron_rl.resharding.executor import Stats, run_plan, verify_checksums
from megatron_rl.resharding.layout import Layout, ModelShape, hf_layout, megatron_layout, padded_vocab, uses_te_names
from megatron_rl.resharding.planner import make_plan
from megatron_rl.resharding.transport import TorchP2P


TIMEOUT_S = 300.0  # the process group's and every transfer's bound (a rank may wait on rank 0's disk)
BUCKET_BYTES = SyncConfig.bucket_bytes  # live sync's default bucket


def _progress(it=None, *, show: bool, desc: str, total=None, unit: str = "tensor"):
    from tqdm import tqdm  # lazy: only for the progress bar

    return tqdm(it, desc=desc, total=total, unit=unit, disable=not show or dist.get_rank() != 0, leave=False)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _config_dtype(cfg, fallback: torch.dtype) -> str:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return _dtype_name(d) if d is not None else _dtype_name(fallback)


def setup_model(hf_config, *, tp: int, pp: int, dtype: torch.dtype, vocab_divisible_by: int):
    """Parallel state + this rank's model + the layout (checked against the model's parameters)."""

    parallel = ParallelConfig(tp=tp, pp=pp)
    topo = init_distributed(parallel)
    (model,) = build_gpt(hf_config, parallel=parallel, topo=topo, dtype=dtype, vocab_divisible_by=vocab_divisible_by)
    params = mio.local_params(model)
    te_names = uses_te_names(params)
    layout = megatron_layout(ModelShape.from_hf_config(hf_config), topo.grid, vocab_divisible_by=vocab_divisible_by,
                             te_names=te_names)
    mio.check_names(layout.local(topo.rank), params, rank=topo.rank)
    return model, params, layout


def fill_from_hf(params: dict, layout: Layout, ckpt: hfio.HFCheckpoint, *, progress: bool = False) -> None:
    """Copy this rank's local tensors from HF slices (``assemble`` over ``ckpt.read``)."""
    local = layout.local(dist.get_rank())
    mio.fill_local(params, local, ckpt, wrap=lambda it: _progress(it, show=progress, desc="hf->megatron",
                                                                   total=len(local)))


def move(src: Layout, params: dict[str, torch.Tensor], *, dst: Layout, deliver: Callable[[str, torch.Tensor], None],
         dtype: torch.dtype, bucket_bytes: int = BUCKET_BYTES, verify: bool = False, progress: bool = False,
         desc: str = "move") -> Stats:
    """Run the plan from ``src`` (this rank's tensors ``params``) to ``dst`` with the sync executor
    (collective over the world); ``deliver(name, shard)`` takes each finished ``dst`` shard of
    this rank. ``verify`` compares every slice's checksums afterwards and raises on a mismatch."""
    rank = dist.get_rank()
    plan = make_plan(src, dst=dst, bucket_bytes=bucket_bytes, elem_size=torch.empty((), dtype=dtype).element_size())
    bar = _progress(show=progress, desc=desc, total=len(plan.buckets), unit="bucket")
    stats = run_plan(plan, rank, get_src=params.__getitem__, deliver=deliver, transport=TorchP2P(timeout=TIMEOUT_S),
                     dst_dtype=dtype, device=coll.backend_device(), checksums=verify,
                     after_bucket=lambda k: bar.update())
    bar.close()
    if verify:
        verify_checksums(plan, stats, rank=rank, what=desc)
    return stats


def save_checkpoint(model, out: str, *, hf_dir: str, vocab_divisible_by: int = 128, overwrite: bool = False,
                    tmp: Optional[str] = None) -> None:
    """Save ``model`` (this rank's chunk, current parallel state) as a megatron_rl checkpoint (collective).

    Writes the dist checkpoint, ``megatron_rl.json`` and ``hf/`` (config + tokenizer copied from
    ``hf_dir``) into a temporary sibling of ``out`` and renames it when every rank is done;
    with ``tmp`` given, writes there and leaves publishing to the caller.
    """

    def work(path):
        mio.save_model(model, path)
        if dist.get_rank() == 0:
            os.makedirs(os.path.join(path, mio.HF_SUBDIR), exist_ok=True)
            hfio.copy_hf_extras(hf_dir, os.path.join(path, mio.HF_SUBDIR))
            cfg = AutoConfig.from_pretrained(hf_dir)
            shape = ModelShape.from_hf_config(cfg)
            shard = model_shard(model)  # the layout it is saved at: the model's own groups
            dtype = next(iter(mio.local_params(model).values())).dtype
            mio.write_meta(path, mio.MegatronMeta(
                tp=shard.tp, pp=shard.pp, vocab_divisible_by=vocab_divisible_by,
                padded_vocab=padded_vocab(shape.vocab, divisible_by=vocab_divisible_by, tp=shard.tp),
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
                  vocab_divisible_by: int = 128, param_dtype: Optional[str] = None, model_key: Optional[str] = None):
    """Parallel state + model with checkpoint ``src`` loaded (collective); layout defaults to the saved one.

    ``hf_dir`` marks ``src`` as a plain megatron-core dist checkpoint (no megatron_rl.json, e.g.
    an RL checkpoint's ``dist/``, whose optimizer state is not read): the model comes from that
    HF config, at ``tp``/``pp`` (default 1/1), in ``param_dtype`` (default the HF config's);
    ``model_key``: the key the model is saved under (``"model"`` beside an optimizer's state).
    """

    if hf_dir is None:
        meta = mio.read_meta(src)
        hf_dir = os.path.join(os.path.abspath(src), mio.HF_SUBDIR)
    else:
        meta = mio.plain_meta(src, hf_dir=hf_dir, tp=tp or 1, pp=pp or 1, vocab_divisible_by=vocab_divisible_by,
                              param_dtype=param_dtype)
    model, params, layout = setup_model(AutoConfig.from_pretrained(hf_dir), tp=tp or meta.tp, pp=pp or meta.pp,
                                        dtype=hfio.torch_dtype(meta.param_dtype),
                                        vocab_divisible_by=meta.vocab_divisible_by)
    mio.load_model(model, src, key=model_key)
    return meta, model, params, layout


def write_hf(params: dict, layout: Layout, tmp: str, *, shape: ModelShape, hf_dir: str, dtype: torch.dtype,
             max_shard_bytes: int = 5 * 2**30, bucket_bytes: int = BUCKET_BYTES, verify: bool = False,
             progress: bool = False) -> None:
    """Move every canonical tensor to rank 0 (the plan ``layout`` -> ``hf_layout``) and write HF
    safetensors + config/tokenizer into ``tmp`` (collective)."""
    writer = None
    if dist.get_rank() == 0:
        writer = hfio.SafetensorsStreamWriter(tmp, shapes=layout.canon_shapes, max_shard_bytes=max_shard_bytes,
                                              dtype=dtype)
    move(layout, params, dst=hf_layout(shape, rank=0), deliver=writer.write if writer else _nothing_delivered,
         dtype=dtype, bucket_bytes=bucket_bytes, verify=verify, progress=progress, desc="megatron->hf")
    if writer is not None:
        writer.close()
        hfio.copy_hf_extras(hf_dir, tmp)
        hfio.ensure_generation_config(tmp)
    coll.barrier()


def _nothing_delivered(name: str, shard: torch.Tensor) -> None:
    raise AssertionError(f"HF export: rank {dist.get_rank()} was handed {name!r}; only rank 0 holds HF tensors")


def megatron_to_hf(src: str, tmp: str, *, dtype: Optional[str] = None, max_shard_bytes: int = 5 * 2**30,
                   hf_dir: Optional[str] = None, tp: Optional[int] = None, pp: Optional[int] = None,
                   vocab_divisible_by: int = 128, param_dtype: Optional[str] = None, model_key: Optional[str] = None,
                   bucket_bytes: int = BUCKET_BYTES, verify: bool = False, progress: bool = False) -> None:
    """Dist checkpoint ``src`` -> HF safetensors + config + generation config + tokenizer in ``tmp``
    (collective).

    ``hf_dir``/``tp``/``pp``/``vocab_divisible_by``/``param_dtype``/``model_key``: for a plain dist checkpoint
    (an RL checkpoint's policy too), see :func:`load_megatron`.
    """

    meta, model, params, layout = load_megatron(src, hf_dir=hf_dir, tp=tp, pp=pp, vocab_divisible_by=vocab_divisible_by,
                                                param_dtype=param_dtype, model_key=model_key)
    write_hf(params, layout, tmp, shape=meta.model_shape,
             hf_dir=hf_dir or os.path.join(os.path.abspath(src), mio.HF_SUBDIR),
             dtype=hfio.torch_dtype(dtype or meta.hf_dtype), max_shard_bytes=max_shard_bytes,
             bucket_bytes=bucket_bytes, verify=verify, progress=progress)
    destroy_distributed(keep_process_group=True)


def reshard(src: str, tmp: str, *, tp: int, pp: int, bucket_bytes: int = BUCKET_BYTES, verify: bool = False,
            progress: bool = False) -> None:
    """Megatron ``src`` (at its saved layout) -> Megatron(tp, pp) in ``tmp``, by one plan (collective).

    The world must hold whole replicas of both layouts (a multiple of lcm(a, b)). Each rank
    loads its source shard, the source layout's parallel state is torn down, the new layout's
    is built, and the plan moves every shard into the new model, which is then saved.
    """
    meta, _, old, src_layout = load_megatron(src)
    old = {n: p.detach() for n, p in old.items()}  # the tensors outlive the source layout's groups
    destroy_distributed(keep_process_group=True)
    hf_dir = os.path.join(os.path.abspath(src), mio.HF_SUBDIR)
    model, params, layout = setup_model(AutoConfig.from_pretrained(hf_dir), tp=tp, pp=pp,
                                        dtype=hfio.torch_dtype(meta.param_dtype),
                                        vocab_divisible_by=meta.vocab_divisible_by)

    def deliver(name: str, shard: torch.Tensor) -> None:
        with torch.no_grad():
            params[name].copy_(shard)

    move(src_layout, old, dst=layout, deliver=deliver, dtype=hfio.torch_dtype(meta.param_dtype),
         bucket_bytes=bucket_bytes, verify=verify, progress=progress, desc="reshard")
    del old
    save_checkpoint(model, tmp, hf_dir=hf_dir, vocab_divisible_by=meta.vocab_divisible_by, tmp=tmp)
    destroy_distributed(keep_process_group=True)


def ensure_process_group(timeout_s: float = TIMEOUT_S) -> None:
    """The world's process group (gloo on CPU; NCCL bound to this rank's GPU, connected eagerly
    like :func:`~megatron_rl.parallel.init_distributed`'s, so a plan's first bucket may skip ranks)."""
    if not dist.is_initialized():
        kw = {}
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            kw["device_id"] = device
        dist.init_process_group(backend="nccl" if kw else "gloo", timeout=timedelta(seconds=timeout_s), **kw)


def convert(mode: str, *, src: str, out: str, overwrite: bool = False, tmp: Optional[str] = None, **kw) -> None:
    """Run ``mode`` on every rank into an atomic output (``tmp`` given: the caller publishes it)."""
    ensure_process_group()
    work = {"hf-to-megatron": hf_to_megatron, "megatron-to-hf": megatron_to_hf, "reshard": reshard}[mode]
    if tmp is not None:
        work(src, tmp, **kw)
    else:
        publish.atomic_collective(out, lambda path: work(src, path, **kw), overwrite=overwrite)
