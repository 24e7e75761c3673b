"""Failing fast on one rank: named phases, a watchdog, process groups with timeouts.

A :class:`RankRuntime` belongs to one rank process. It records which phase the rank is in
(``rollout``, ``train``, ``sync`` ...), bounds every phase with a watchdog, creates process
groups whose collectives time out, and turns any failure into a record in the run directory
(see :mod:`megatron_rl.runtime.records`) before the process exits non-zero. The launcher then
prints the first failure once (:mod:`megatron_rl.runtime.report`).

Usage (the body of a job run under torchrun)::

    def job(rt):
        rt.init_process_group(backend="gloo")
        for step in range(steps):
            with rt.phase("rollout"):
                ...
            with rt.phase("train"):
                ...

    sys.exit(run_rank(job, run_dir=cfg.logging.run_dir, timeout_s=cfg.parallel.timeout_s))

The watchdog is one daemon thread. It wakes when a phase passes its deadline (it then
records a ``hang``, dumps every thread's stack to this rank's log and exits with
:data:`EXIT_HANG`) and when SIGTERM/SIGINT arrive: it sees them through
``signal.set_wakeup_fd`` even while the main thread is blocked inside a C++ collective,
records the rank as ``terminated`` and exits at once, so torchrun's agent never waits
for its SIGKILL grace period.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import math
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Callable, Optional

import torch.distributed as dist

from megatron_rl import console
from megatron_rl.runtime import faults
from megatron_rl.runtime.records import archive_attempt, classify, failure_path, status_path, write_json


EXIT_FAILED = 1
EXIT_HANG = 3
# The test setting of the fault seam's "rank:phase" point (see megatron_rl.runtime.faults).
FAULT_ENV = faults.RANK_FAULT_ENV


def restart_count() -> int:
    """How often torchrun restarted this job's ranks before this attempt (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _log_files() -> dict:
    """stdout/stderr files torchrun writes for this rank (``--log-dir`` with ``--redirects``)."""
    err_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not err_file:
        return {}
    d = os.path.dirname(err_file)
    return {"stdout": os.path.join(d, "stdout.log"), "stderr": os.path.join(d, "stderr.log")}


class RankRuntime:
    """Phase tracking, watchdog and failure records for one rank (see the module docstring)."""

    def __init__(self, run_dir: str, *, timeout_s: float, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.run_dir = run_dir
        self.timeout_s = float(timeout_s)
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.host = socket.gethostname()
        self._lock = threading.Lock()
        self._phase, self._phase_start, self._deadline = "main", time.time(), None
        self._failure: Optional[dict] = None
        self._phase_timeout = self.timeout_s
        self._stop = threading.Event()
        self._wake_r = self._wake_w = None
        self._thread: Optional[threading.Thread] = None
        self.attempt = restart_count()
        self.step: Optional[int] = None  # the job's current step (set by the job), kept in the records

    # -- records ---------------------------------------------------------------------------
    def _status(self, state: str, **extra) -> None:
        rec = {"rank": self.rank, "world_size": self.world_size, "host": self.host, "pid": os.getpid(),
               "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "phase": self._phase,
               "phase_started": self._phase_start, "state": state, "time": time.time(), "logs": _log_files(),
               "attempt": self.attempt, "step": self.step}
        rec.update(extra)
        write_json(status_path(self.run_dir, self.rank), rec)

    def record_failure(self, exc: BaseException, *, kind: Optional[str] = None) -> dict:
        """Write this rank's failure record (once) and return it."""
        kind = kind or classify(exc)
        first_line = (str(exc).strip().splitlines() or [""])[0][:500]
        rec = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "phase": self._phase, "kind": kind,
               "error": f"{type(exc).__name__}: {first_line}", "time": time.time(), "step": self.step,
               "in_phase_s": round(time.time() - self._phase_start, 3),
               "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]}
        with self._lock:
            self._deadline = None  # the failure is being handled; the watchdog must not add a hang
            if self._failure is None:
                self._failure = rec
                write_json(failure_path(self.run_dir, self.rank), rec)
                self._status("failed", kind=kind)
        return self._failure

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "RankRuntime":
        """Write the first status record, and start the watchdog and the signal hook. After a
        restart, this rank's records of the previous attempt move to ``runtime/attempt<k>/`` first."""
        if self.attempt > 0:
            archive_attempt(self.run_dir, self.rank, attempt=self.attempt - 1)
        self._status("running")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        if threading.current_thread() is threading.main_thread():
            # The C-level handler writes the signal number into the pipe; the watchdog acts on it.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: None)
            signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="megatron_rl-watchdog", daemon=True)
        self._thread.start()
        return self

    def finish(self) -> None:
        """Mark the rank done and stop the watchdog (call on success)."""
        self._deadline = None
        if self._failure is None:
            self._phase = "done"
            self._status("done")
        self._stop.set()
        if self._wake_w is not None:
            os.write(self._wake_w, b"\0")
        if threading.current_thread() is threading.main_thread():  # SIGTERM kills again, as by default
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)

    def _watch(self) -> None:
        while not self._stop.is_set():
            deadline = self._deadline
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ready, _, _ = select.select([self._wake_r], [], [], wait)
            if self._stop.is_set():
                return
            if ready:
                data = os.read(self._wake_r, 64)
                sigs = [b for b in data if b in (signal.SIGTERM, signal.SIGINT)]
                if sigs:
                    self._status("terminated", signal=signal.Signals(sigs[0]).name)
                    os._exit(128 + sigs[0])
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._on_hang()

    def _on_hang(self) -> None:
        elapsed = time.time() - self._phase_start
        exc = TimeoutError(f"phase '{self._phase}' exceeded its {self._phase_timeout:.0f} s timeout "
                           f"(ran {elapsed:.1f} s); thread stacks are in this rank's log")
        self.record_failure(exc, kind="hang")
        console.say(f"[rank {self.rank}] FAILED: {exc}")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(EXIT_HANG)

    # -- phases and process groups ---------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, *, timeout_s: Optional[float] = None):
        """Run the block as phase ``name``; the watchdog fails the rank after ``timeout_s``."""
        outer = (self._phase, self._phase_start, self._deadline, self._phase_timeout)
        self._phase_timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        self._phase, self._phase_start = name, time.time()
        self._deadline = time.monotonic() + self._phase_timeout
        self._status("running")
        faults.fire("rank:phase", step=self.step, phase=name, rank=self.rank, attempt=self.attempt)
        try:
            yield self
        except BaseException as exc:
            self.record_failure(exc)
            raise
        self._phase, self._phase_start, self._deadline, self._phase_timeout = outer

    @property
    def current_phase(self) -> str:
        return self._phase

    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def timeout_minutes(self) -> int:
        """For megatron-core's ``initialize_model_parallel(distributed_timeout_minutes=...)`` (whole minutes)."""
        return max(1, math.ceil(self.timeout_s / 60))

    def init_process_group(self, *, backend: str = "gloo"):
        """``torch.distributed.init_process_group`` with this runtime's collective timeout."""

        with self.phase("init"):
            dist.init_process_group(backend=backend, timeout=self.timeout())
        return dist.group.WORLD

    def new_group(self, ranks, *, backend: Optional[str] = None):
        """``dist.new_group`` with the same timeout (torch's default for subgroups is 30 min)."""

        return dist.new_group(ranks=ranks, timeout=self.timeout(), backend=backend)


def _say_failure(rt: RankRuntime, rec: dict) -> None:
    """The failure headline on the console at once; its traceback there too, or (a quiet console)
    in this rank's log, which the headline names."""
    head = f"[rank {rt.rank}] FAILED in phase '{rec['phase']}' on {rt.host}: {rec['error']}"
    if not console.captured():
        print(f"{head}\n{rec['traceback']}", file=sys.stderr, flush=True)
        return
    print(f"{head} (traceback: {os.path.join(console.log_dir(), 'stderr.log')})", file=console.stderr(), flush=True)
    print(f"{head}\n{rec['traceback']}", file=sys.stderr, flush=True)


def run_rank(job: Callable[[RankRuntime], Optional[int]], *, run_dir: str, timeout_s: float) -> int:
    """Run ``job(rt)`` on this rank; on failure record it, print one line, exit non-zero.

    Returns the exit code on success. On failure it does not return: it exits the process
    with ``os._exit`` so that no destructor waits on a broken process group.
    """
    rt = RankRuntime(run_dir, timeout_s=timeout_s).start()
    try:
        code = job(rt) or 0
    except BaseException as exc:  # noqa: BLE001 - every failure must leave a record
        rec = rt.record_failure(exc)
        if rec["kind"] == "peer_lost":  # a consequence, not a cause: this rank's log only (when captured)
            print(f"[rank {rt.rank}] stopped in phase '{rec['phase']}': a peer was lost ({rec['error']})",
                  file=sys.stderr, flush=True)
        else:
            _say_failure(rt, rec)
        sys.stdout.flush()
        os._exit(EXIT_FAILED)
    rt.finish()
    return code
