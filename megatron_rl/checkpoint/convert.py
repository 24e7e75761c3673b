"""``megatron-rl convert``: HF <-> Megatron checkpoint conversion, offline reshard, and RL export.

Four modes, all through canonical (HF-named) regions of the layout algebra
(:mod:`megatron_rl.resharding.layout`), so there is one code path, not one per case:

- ``hf-to-megatron``: every rank builds its megatron-core model (``megatron_rl.models``), fills
  each local tensor with :func:`~megatron_rl.resharding.layout.assemble` from safetensors slices,
  and saves with ``dist_checkpointing`` (torch_dist);
- ``megatron-to-hf``: every rank loads the checkpoint into its model at the saved layout; the
  plan from that layout to the HF layout (every tensor whole, on rank 0) runs through the live
  sync's executor in buckets of ``--bucket-bytes`` into safetensors shards;
- ``reshard``: Megatron(TP a, PP b) -> Megatron(TP c, PP d) by the plan between the two layouts,
  in one torchrun of lcm(a*b, c*d) ranks;
- ``rl-to-hf``: the trained policy of an RL checkpoint (``checkpoint.dir`` of ``megatron-rl
  train``; the newest complete step, or ``--step``) as an HF model: ``megatron-to-hf`` on the
  policy's dist checkpoint (its optimizer state, the critic and the reference are not read), at the
  layout it was trained at, with the config, tokenizer and generation config of the run's
  ``model.hf_path`` (recorded in the checkpoint's ``COMPLETE``).

``--verify`` (export and reshard) compares every moved slice's checksum at its source and its
destination and fails on any difference.

Run it plainly: it validates everything, then launches ``torchrun`` itself (TP*PP ranks; for a
reshard lcm of both layouts' sizes). Under your own ``torchrun`` the world size must equal that
number. Outputs are written to a hidden temporary sibling and renamed when complete.

    megatron-rl convert hf-to-megatron --src runs/tiny-llama --out runs/llama-tp2pp2 --tp 2 --pp 2
    megatron-rl convert megatron-to-hf --src runs/llama-tp2pp2 --out runs/llama-hf
    megatron-rl convert reshard --src runs/llama-tp2pp2 --out runs/llama-tp1pp1 --tp 1 --pp 1 --verify
    megatron-rl convert rl-to-hf --src runs/demo/ckpt --out runs/demo-hf
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys

import torch.distributed as dist

from megatron_rl.checkpoint import CheckpointError
from megatron_rl.checkpoint import hf as hfio
from megatron_rl.checkpoint import megatron as mio
from megatron_rl.checkpoint import publish, rl, spmd
from megatron_rl.parallel.grid import LayoutError, RankGrid
from megatron_rl.resharding.layout import megatron_layout


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="megatron-rl convert", description=__doc__.split("\n\n")[0].replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n" + "\n".join(
                                     line for line in __doc__.splitlines() if "megatron-rl convert " in line)
                                 + "\n\nRun without torchrun: the tool launches torchrun with TP*PP ranks itself.")
    sub = ap.add_subparsers(dest="mode", required=True, metavar="MODE")
    h2m = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron dist checkpoint at --tp/--pp")
    m2h = sub.add_parser("megatron-to-hf", help="Megatron dist checkpoint -> HF safetensors (transformers-loadable)")
    rsh = sub.add_parser("reshard", help="Megatron(TP a, PP b) -> Megatron(--tp, --pp)")
    r2h = sub.add_parser("rl-to-hf", help="RL checkpoint of `megatron-rl train` -> HF model of its trained policy")
    for p, src in ((h2m, "HF model directory (config.json, model*.safetensors, tokenizer)"),
                   (m2h, "Megatron checkpoint directory written by this tool"),
                   (rsh, "Megatron checkpoint directory written by this tool"),
                   (r2h, "the run's checkpoint.dir (holding step_<k>/), or one step_<k> directory")):
        p.add_argument("--src", required=True, help=src)
        p.add_argument("--out", required=True, help="output directory; must not exist (written atomically)")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--_tmp", dest="tmp", help=argparse.SUPPRESS)  # set by the launching parent
    for p in (m2h, rsh, r2h):
        p.add_argument("--bucket-bytes", type=int, default=spmd.BUCKET_BYTES,
                       help=f"bytes per rank and bucket of the move (default {spmd.BUCKET_BYTES}, as sync.bucket_bytes)")
        p.add_argument("--verify", action="store_true", help="compare every moved slice's checksums (one all-reduce)")
    for p in (h2m, rsh):
        p.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the output")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the output (default 1)")
    h2m.add_argument("--vocab-divisible-by", type=int, default=128,
                     help="pad the vocab to a multiple of lcm(this, TP) (default 128, as Megatron-LM)")
    h2m.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"),
                     help="dtype of the Megatron parameters (default: the HF tensors' dtype)")
    for p in (m2h, r2h):
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="dtype of the HF tensors (default: the source HF model's dtype)")
        p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard (default 5)")
    _rl_args(r2h)
    m2h.add_argument("--hf-config", help="for a plain megatron-core dist checkpoint (no megatron_rl.json, e.g. saved "
                     "by a training job): the HF directory with its config.json and tokenizer")
    m2h.add_argument("--tp", type=int, default=1, help="with --hf-config: TP to load at (any valid; default 1)")
    m2h.add_argument("--pp", type=int, default=1, help="with --hf-config: PP to load at (any valid; default 1)")
    m2h.add_argument("--vocab-divisible-by", type=int, default=128,
                     help="with --hf-config: the vocab padding the checkpoint was saved with (default 128)")
    return ap.parse_args(argv)


def _rl_args(r2h) -> None:
    r2h.add_argument("--step", type=int, help="the step to export (default: the newest complete checkpoint)")
    r2h.add_argument("--hf-config", help="the HF directory with the trained model's config.json and tokenizer "
                     "(default: the run's model.hf_path, recorded in the checkpoint)")
    r2h.add_argument("--tp", type=int, help="TP to load the policy at (default: the layout it was trained at)")
    r2h.add_argument("--pp", type=int, help="PP to load the policy at (default: the layout it was trained at)")


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be checked before a process exists.


def check_layout(shape, *, tp: int, pp: int, vocab_divisible_by: int = 128) -> RankGrid:
    if tp < 1 or pp < 1:
        raise CheckpointError(f"--tp/--pp: must be >= 1, got tp={tp} pp={pp}; fix: pass positive sizes")
    try:
        grid = RankGrid(world_size=tp * pp, tp=tp, pp=pp)
        megatron_layout(shape, grid, vocab_divisible_by=vocab_divisible_by)
    except LayoutError as e:
        raise CheckpointError(f"--tp {tp} --pp {pp}: {e}") from None
    if vocab_divisible_by % tp:
        raise CheckpointError(f"--vocab-divisible-by {vocab_divisible_by}: not a multiple of --tp {tp}, so the "
                              "padded vocab would change with TP; fix: use a multiple of every TP you will use")
    return grid


def check_world(info: dict) -> None:
    world, nproc = os.environ.get("WORLD_SIZE"), info["nproc"]
    if world is not None and int(world) != nproc:
        need = info.get("why") or f"TP*PP = {info['tp']}*{info['pp']} = {nproc}"
        raise CheckpointError(f"WORLD_SIZE={world} != {need}; fix: launch torchrun with "
                              f"--nproc-per-node {nproc}, or run the tool without torchrun (it launches its own)")


def check_bucket(shape, *, bucket_bytes: int, dtype: str) -> None:
    """The move's bucket must hold one row of every tensor, along either dimension a layout splits."""
    elem = hfio.torch_dtype(dtype).itemsize
    need, name = max((math.prod(s) // s[d] * elem, n) for n, s in shape.canonical_shapes().items() for d in range(len(s)))
    if bucket_bytes < need:
        raise CheckpointError(f"--bucket-bytes {bucket_bytes}: smaller than one row ({need} bytes) of {name}; "
                              f"fix: pass --bucket-bytes {need} or more")


def validate(args) -> dict:
    """Check inputs and output; return what the workers need. Raises CheckpointError."""

    publish.check_output_dir(args.out, overwrite=args.overwrite)
    if args.mode == "rl-to-hf":
        return _validate_rl(args)
    if args.mode == "hf-to-megatron":
        ckpt = hfio.open_hf(args.src)
        check_layout(ckpt.shape, tp=args.tp, pp=args.pp, vocab_divisible_by=args.vocab_divisible_by)
        return dict(tp=args.tp, pp=args.pp, shape=ckpt.shape, nproc=args.tp * args.pp)
    meta = _meta_for(args)
    if args.mode == "reshard":
        check_layout(meta.model_shape, tp=args.tp, pp=args.pp, vocab_divisible_by=meta.vocab_divisible_by)
        check_bucket(meta.model_shape, bucket_bytes=args.bucket_bytes, dtype=meta.param_dtype)
        a, b = meta.tp * meta.pp, args.tp * args.pp
        nproc = math.lcm(a, b)  # whole replicas of both layouts
        return dict(tp=args.tp, pp=args.pp, shape=meta.model_shape, meta=meta, nproc=nproc,
                    why=f"lcm(source TP*PP, TP*PP) = lcm({a}, {b}) = {nproc}")
    check_bucket(meta.model_shape, bucket_bytes=args.bucket_bytes, dtype=args.dtype or meta.hf_dtype)
    return dict(tp=meta.tp, pp=meta.pp, shape=meta.model_shape, meta=meta, nproc=meta.tp * meta.pp)


def rl_export(args) -> tuple[rl.PolicySource, dict]:
    """The RL checkpoint's policy and :func:`~.spmd.megatron_to_hf`'s arguments that export it."""
    src = rl.policy_source(args.src, step=args.step, hf_dir=args.hf_config)
    kw = dict(hf_dir=src.hf_dir, tp=src.tp if args.tp is None else args.tp, pp=src.pp if args.pp is None else args.pp,
              vocab_divisible_by=src.vocab_divisible_by, param_dtype=src.param_dtype, model_key=rl.POLICY_KEY)
    return src, kw


def _validate_rl(args) -> dict:
    src, kw = rl_export(args)
    meta = mio.plain_meta(src.dist_dir, **{k: v for k, v in kw.items() if k != "model_key"})
    check_layout(meta.model_shape, tp=meta.tp, pp=meta.pp, vocab_divisible_by=meta.vocab_divisible_by)
    check_bucket(meta.model_shape, bucket_bytes=args.bucket_bytes, dtype=args.dtype or meta.hf_dtype)
    return dict(tp=meta.tp, pp=meta.pp, shape=meta.model_shape, meta=meta, nproc=meta.tp * meta.pp, step=src.step)


def _meta_for(args):
    if args.mode == "megatron-to-hf" and args.hf_config:
        meta = mio.plain_meta(args.src, hf_dir=args.hf_config, tp=args.tp, pp=args.pp,
                              vocab_divisible_by=args.vocab_divisible_by)
        check_layout(meta.model_shape, tp=args.tp, pp=args.pp, vocab_divisible_by=args.vocab_divisible_by)
        return meta
    return mio.read_meta(args.src)


# ---------------------------------------------------------------------------------------------
# Launching.


def _torchrun(argv: list[str], nproc: int) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "megatron_rl.checkpoint.convert", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd, env=env).returncode


def launch(args, info: dict) -> int:
    """Parent (not under torchrun): own the temporary output, run the ranks, publish."""

    tmp = publish.make_partial_dir(args.out)
    try:
        pin = ["--step", str(info["step"])] if args.mode == "rl-to-hf" else []  # the step validated, even if
        rc = _torchrun(args.raw_argv + pin + ["--_tmp", tmp], info["nproc"])  # the run saves a newer one meanwhile
        if rc != 0:
            print(f"error: convert {args.mode} failed (exit {rc}); no output written to {args.out}", file=sys.stderr)
            return rc
        publish.publish_dir(tmp, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return 0
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def run_spmd(args) -> int:
    """On every rank under torchrun: run the conversion, then tear the process group down."""


    mode, src = args.mode, args.src
    if mode == "hf-to-megatron":
        kw = dict(tp=args.tp, pp=args.pp, vocab_divisible_by=args.vocab_divisible_by, param_dtype=args.param_dtype)
    elif mode == "reshard":
        kw = dict(tp=args.tp, pp=args.pp, bucket_bytes=args.bucket_bytes, verify=args.verify)
    else:
        kw = dict(dtype=args.dtype, max_shard_bytes=int(args.max_shard_size * 2**30), bucket_bytes=args.bucket_bytes,
                  verify=args.verify)
        if mode == "rl-to-hf":  # the policy's dist checkpoint, as a plain one (its HF source named)
            policy, more = rl_export(args)
            mode, src = "megatron-to-hf", policy.dist_dir
            kw.update(more)
        elif args.hf_config:
            kw.update(hf_dir=args.hf_config, tp=args.tp, pp=args.pp, vocab_divisible_by=args.vocab_divisible_by)
    try:
        spmd.convert(mode, src=src, out=args.out, overwrite=args.overwrite, tmp=args.tmp,
                     progress=not args.no_progress, **kw)
        if args.tmp is None and dist.get_rank() == 0:
            print(f"wrote {args.out}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.raw_argv = argv
    try:
        if args.tmp is None:
            info = validate(args)
            if not os.environ.get("WORLD_SIZE"):
                return launch(args, info)
            check_world(info)
        return run_spmd(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
