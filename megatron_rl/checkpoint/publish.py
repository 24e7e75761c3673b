"""Atomic publish: write into a hidden temporary sibling, fsync, then rename into place.

A killed writer leaves only a ``.<name>.partial-<host>-<pid>`` sibling (removed by the next run on
that host once the pid is gone), never a half-written output. Used by HF export (:mod:`.hf`),
conversion (:mod:`.spmd`, :mod:`.convert`) and RL checkpoints (:mod:`.rl`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket

import torch.distributed as dist

from megatron_rl.checkpoint import CheckpointError
from megatron_rl.parallel import collectives as coll


def _fail(where: str, problem: str, fix: str):
    raise CheckpointError(f"{where}: {problem}; fix: {fix}")


def close_synced(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def partial_prefix(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial-")


def check_output_dir(out_dir: str, *, overwrite: bool = False, flag: str = "--out") -> None:
    """Fail before any work when the output exists (unless ``overwrite``) or its parent is missing."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        _fail(f"{flag} {out_dir}", "output directory already exists",
              "choose a new output path, or pass --overwrite to replace it")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        _fail(f"{flag} {out_dir}", f"parent directory {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK):
        _fail(f"{flag} {out_dir}", f"parent directory {parent} is not writable", "choose a writable location")


def clean_stale_partials(out_dir: str) -> list[str]:
    """Remove temporary siblings left by killed runs on this host (their pid is gone)."""
    removed = []
    host = socket.gethostname()
    for p in glob.glob(partial_prefix(out_dir) + "*"):
        tail = p[len(partial_prefix(out_dir)):]
        h, _, pid = tail.rpartition("-")
        if h == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_partial_dir(out_dir: str) -> str:
    """A fresh hidden sibling of ``out_dir`` to write into (named after this host and pid)."""
    clean_stale_partials(out_dir)
    tmp = f"{partial_prefix(out_dir)}{socket.gethostname()}-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def publish_dir(tmp: str, out_dir: str, *, overwrite: bool = False) -> None:
    """fsync every file under ``tmp``, then rename it to ``out_dir`` (replacing it if asked)."""
    out_dir = os.path.abspath(out_dir)
    for root, _, names in os.walk(tmp):
        for n in names:
            fd = os.open(os.path.join(root, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)
    old = None
    if os.path.exists(out_dir):
        if not overwrite:
            _fail(out_dir, "appeared while converting", "choose a new output path, or pass --overwrite")
        old = tmp + ".old"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    fsync_dir(os.path.dirname(out_dir))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out_dir: str, *, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds."""
    check_output_dir(out_dir, overwrite=overwrite)
    tmp = make_partial_dir(out_dir)
    try:
        yield tmp
        publish_dir(tmp, out_dir, overwrite=overwrite)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_collective(out: str, work, *, overwrite: bool = False) -> None:
    """Run ``work(tmp)`` on every rank into a temporary sibling of ``out``; rank 0 publishes it."""
    box = [make_partial_dir(out) if dist.get_rank() == 0 else None]
    box[0] = coll.broadcast_object(box[0], src=0)
    try:
        work(box[0])
        coll.barrier()
        if dist.get_rank() == 0:
            publish_dir(box[0], out, overwrite=overwrite)
        coll.barrier()
    finally:
        if dist.get_rank() == 0 and os.path.exists(box[0]):
            shutil.rmtree(box[0], ignore_errors=True)


def publish_marked(tmp: str, final: str, *, marker: str, meta: dict) -> None:
    """Write the ``marker`` file (json ``meta``) into ``tmp``, then publish it as ``final``, replacing it."""
    write_json(os.path.join(tmp, marker), meta)
    publish_dir(tmp, final, overwrite=True)
