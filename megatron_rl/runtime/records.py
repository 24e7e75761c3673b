"""Per-rank status and failure records in the run directory, and the root-cause verdict.

Every rank keeps two small JSON files under ``<run_dir>/runtime/``:

- ``ranks/rank{r}.json``: who and where it is (rank, host, pid, log files), the phase it is
  in, and its state: ``running``, ``done``, ``failed`` or ``terminated`` (stopped by the
  launcher with SIGTERM after another rank failed).
- ``failures/rank{r}.json``: written once when the rank fails, with the phase, the kind of
  failure and the exception.

A rank killed by SIGKILL or the OOM killer writes nothing more, so its status stays
``running`` in the phase where it died; :func:`root_cause` uses that to name it. Failures
are classified so that the consequence (a peer's broken connection, a collective timing
out) is not mistaken for the cause:

- ``exception``: our code raised (the cause);
- ``hang``: the phase watchdog fired (the cause, or a peer of a rank that hangs);
- ``peer_lost``: a collective failed because another rank went away (a consequence).

Usage::

    write_json(status_path(run_dir, rank), {...})
    verdict = root_cause(load_records(run_dir))   # -> (headline, details)
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

# Substrings of backend errors raised in a surviving rank when a peer dies or stops answering.
_PEER_LOST_MARKERS = (
    "connection closed by peer", "connection reset", "broken pipe", "read error", "write error",
    "timed out", "timeout", "nccl communicator was aborted", "remote process exited",
    "socket closed", "connection refused", "ecconnreset", "econnreset", "unexpected end of file",
)


def runtime_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "runtime")


def status_path(run_dir: str, rank: int) -> str:
    return os.path.join(runtime_dir(run_dir), "ranks", f"rank{rank}.json")


def failure_path(run_dir: str, rank: int) -> str:
    return os.path.join(runtime_dir(run_dir), "failures", f"rank{rank}.json")


def attempt_dir(run_dir: str, attempt: int) -> str:
    """Where the records of an earlier attempt of this launch are kept (torchrun restarts)."""
    return os.path.join(runtime_dir(run_dir), f"attempt{attempt}")


def archive_attempt(run_dir: str, rank: int, *, attempt: int) -> None:
    """Move ``rank``'s status and failure records to :func:`attempt_dir` (each rank moves its own
    before writing anything new, so no rank reads a half-moved attempt after the first barrier)."""
    for sub in ("ranks", "failures"):
        src = os.path.join(runtime_dir(run_dir), sub, f"rank{rank}.json")
        if os.path.exists(src):
            dst = os.path.join(attempt_dir(run_dir, attempt), sub, f"rank{rank}.json")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)


def write_json(path: str, obj: dict) -> None:
    """Atomic write (tmp + rename): a reader never sees half a record, even after SIGKILL."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def classify(exc: BaseException) -> str:
    """``peer_lost`` for backend errors caused by another rank, else ``exception``."""
    try:
        import torch.distributed as dist  # lazy: the failure report (runtime/report.py) reads records without loading torch

        backend_errors = tuple(c for c in (getattr(dist, "DistBackendError", None),
                                           getattr(dist, "DistNetworkError", None)) if c)
    except ImportError:  # the report runs without torch too
        backend_errors = ()
    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, backend_errors) or any(m in text for m in _PEER_LOST_MARKERS):
        return "peer_lost"
    return "exception"


def _load_dir(path: str) -> list:
    out = []
    for name in sorted(glob.glob(os.path.join(path, "rank*.json"))):
        try:
            with open(name) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue  # a record being replaced right now; the rename makes this rare
    return sorted(out, key=lambda r: r.get("rank", -1))


def load_records(run_dir: str, *, attempt: Optional[int] = None) -> dict:
    """``{"status": [...], "failures": [...]}`` as written by the ranks of the last launch (its
    current attempt), or of an earlier ``attempt`` of it."""
    root = runtime_dir(run_dir) if attempt is None else attempt_dir(run_dir, attempt)
    return {"status": _load_dir(os.path.join(root, "ranks")),
            "failures": _load_dir(os.path.join(root, "failures"))}


def _where(rec: dict) -> str:
    return f"rank {rec.get('rank')} (host {rec.get('host')}, pid {rec.get('pid')})"


def root_cause(records: dict) -> Optional[tuple]:
    """``(headline, [detail lines])`` naming the first failure, or None if no rank failed."""
    failures, status = records["failures"], records["status"]
    causes = sorted((f for f in failures if f.get("kind") in ("exception", "hang")), key=lambda f: f["time"])
    if causes:
        first = causes[0]
        verb = "hung (watchdog)" if first["kind"] == "hang" else "raised"
        head = f"{_where(first)} {verb} in phase '{first.get('phase')}': {first.get('error')}"
        same = [f for f in causes[1:] if f.get("error") == first.get("error")]
        others = [f"also: {_where(f)} {f['kind']} in phase '{f.get('phase')}': {f.get('error')}"
                  for f in causes[1:] if f not in same]
        if same:
            others.insert(0, f"also: ranks {','.join(str(f['rank']) for f in same)} failed with the same error")
        return head, others + _consequences(failures, exclude={first["rank"]})
    vanished = [s for s in status if s.get("state") == "running"]
    if vanished and (failures or any(s.get("state") in ("terminated", "failed") for s in status)):
        heads = [f"{_where(s)} died in phase '{s.get('phase')}' without a Python exception "
                 f"(killed by a signal such as SIGKILL, the OOM killer, or a crash)" for s in vanished]
        return heads[0], heads[1:] + _consequences(failures, exclude=set())
    lost = sorted((f for f in failures if f.get("kind") == "peer_lost"), key=lambda f: f["time"])
    if lost:
        first = lost[0]
        return (f"{_where(first)} lost a peer in phase '{first.get('phase')}' (the failing peer left no record; "
                f"check the launcher output of every node): {first.get('error')}"), _consequences(lost[1:], set())
    return None


def _consequences(failures: list, exclude: set) -> list:
    lost = [f for f in failures if f.get("kind") == "peer_lost" and f.get("rank") not in exclude]
    if not lost:
        return []
    ranks = ",".join(str(f["rank"]) for f in lost)
    return [f"then ranks {ranks} stopped because a peer was lost (consequence, not cause)"]


def first_cause(records: dict) -> Optional[dict]:
    """The record of the rank that failed first, with ``how`` it failed, or None: a raise or hang
    (earliest), else a rank that vanished (SIGKILL, OOM: still ``running``), else the first
    rank that lost a peer. The structured twin of :func:`root_cause`."""
    failures, status = records["failures"], records["status"]
    causes = sorted((f for f in failures if f.get("kind") in ("exception", "hang")), key=lambda f: f["time"])
    if causes:
        how = "hung (watchdog)" if causes[0]["kind"] == "hang" else f"raised {causes[0].get('error')}"
        return {**causes[0], "how": how}
    vanished = [s for s in status if s.get("state") == "running"]
    if vanished:
        return {**vanished[0], "how": "died without a Python exception (SIGKILL, the OOM killer or a crash)"}
    lost = sorted((f for f in failures if f.get("kind") == "peer_lost"), key=lambda f: f["time"])
    return {**lost[0], "how": f"lost a peer: {lost[0].get('error')}"} if lost else None
