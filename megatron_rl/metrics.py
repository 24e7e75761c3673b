"""Observability for the RL loop: per-step metrics (JSONL, TensorBoard), a progress bar, and a
per-phase time and memory table. Rank 0 speaks; every other rank stays quiet unless it fails.

Usage::

    quiet_other_ranks(rank)                       # first thing in main(), before importing vLLM
    timer = PhaseTimer()
    log = MetricsLogger(cfg.logging.run_dir, rank=rank, total_steps=cfg.train.steps)
    for step in ...:
        with timer.phase("rollout"):
            ...
        log.log(step, {**reward_stats(rewards, group_size=G), **timer.step_metrics(), "loss": loss})
    log.close()

Metric names are flat, ``group/name`` (TensorBoard groups on the ``/``): see :data:`STEP_FIELDS`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
import contextlib
from contextlib import contextmanager
from typing import Iterable, Optional, Sequence

import torch

from megatron_rl import console

PHASES = ("rollout", "release", "train", "sync", "resume")  # every step has these
OPTIONAL_PHASES = ("ref",)  # the KL reference's forward (algorithm.kl_coef > 0)
TABLE_ORDER = ("eval", "rollout", "release", "critic", "ref", "train", "critic_train", "sync", "resume")  # phase_table rows, in step order
_MIB = float(1 << 20)

# Every field the trainer writes per step; the end-to-end test checks all of them.
STEP_FIELDS = (
    "step", "reward/mean", "reward/std", "reward/min", "reward/max", "reward/zero_adv_groups",
    "response_len/mean", "response_len/max", "response_len/truncated_frac",
    "loss", "pg_loss", "kl", "grad_norm", "lr", "clip_frac", "tis_weight_mean", "tis_clip_frac",
    "mismatch/abs_mean", "mismatch/abs_max", "mismatch/kl_k1", "mismatch/kl_k3",
    *[f"time/{p}_s" for p in PHASES], "time/step_s", *[f"mem/{p}_mib" for p in PHASES],
)


# Warnings every CPU run prints, that say nothing actionable (the fallbacks are intended).
_KNOWN_NOISE = (r".*(Transformer Engine|Apex).* not installed.*", r".*full scope is deprecated.*")


def quiet_known_noise() -> None:
    """Drop the warnings that every CPU run prints and that say nothing actionable."""
    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def quiet_other_ranks(rank: int) -> None:
    """Silence library chatter on ranks other than 0 (errors still show), and known noise on all."""
    quiet_known_noise()
    # read when vLLM is first imported; INFO lines every step would break the progress bar
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING" if rank == 0 else "ERROR")
    if rank == 0:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)


# ---------------------------------------------------------------------------------------------
# Phase timing and memory.


def memory_mib(device: Optional[torch.device] = None) -> dict[str, float]:
    """Memory now, in MiB: ``rss`` (the process, on CPU) or, on GPU, torch's ``allocated``/``reserved``
    and the driver's ``device_used`` (total - free: sees vLLM's sleep, which torch's counters miss)."""
    if device is not None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"allocated": torch.cuda.memory_allocated(device) / _MIB,
                "reserved": torch.cuda.memory_reserved(device) / _MIB, "device_used": (total - free) / _MIB}
    import psutil  # lazy: host memory only, off the CUDA path

    return {"rss": psutil.Process().memory_info().rss / _MIB}


def resource_usage() -> dict[str, float]:
    """What this process holds now, to spot leaks over a long run: ``rss_mib``, open file
    descriptors (``fds``, /proc/self/fd), ``threads`` (/proc/self/task) and the POSIX shared-memory
    segments it maps or keeps open (``shm``: distinct /dev/shm paths, unlinked ones included).
    Linux only; a few ms per call."""
    fds = os.listdir("/proc/self/fd")
    shm = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # the listdir's own fd is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("/dev/shm/"):
                shm.add(target.removesuffix(" (deleted)"))
    with open("/proc/self/maps") as f:
        for line in f:
            at = line.find("/dev/shm/")
            if at >= 0:
                shm.add(line[at:].rstrip("\n").removesuffix(" (deleted)"))
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {"rss_mib": rss_pages * os.sysconf("SC_PAGE_SIZE") / _MIB, "fds": float(len(fds)),
            "threads": float(len(os.listdir("/proc/self/task"))), "shm": float(len(shm))}


class PhaseTimer:
    """Wall time and memory of each named phase of a step.

    ``with timer.phase("train"): ...`` adds the phase's seconds (a phase may run several
    times per step) and records the memory at its end. A phase opened inside another (e.g.
    "ref" inside "train") is timed on its own and its seconds are not counted in the outer
    one, so the phases still add up to at most the step. :meth:`step_metrics` returns them and
    starts the next step. On GPU the device is synchronised so the time covers the kernels.
    """

    def __init__(self, *, device: Optional[torch.device] = None):
        self.device = device
        self._seconds: dict[str, float] = {}
        self._memory: dict[str, dict[str, float]] = {}
        self._open: list = []  # [name, start] of the phases entered and not yet left, outermost first
        self._step_start = time.perf_counter()

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _stop(self, entry: list, now: float) -> None:
        self._seconds[entry[0]] = self._seconds.get(entry[0], 0.0) + now - entry[1]

    @contextmanager
    def phase(self, name: str):
        self._sync()
        now = time.perf_counter()
        if self._open:  # pause the enclosing phase
            self._stop(self._open[-1], now)
        entry = [name, now]
        self._open.append(entry)
        try:
            yield
        finally:
            self._sync()
            now = time.perf_counter()
            self._stop(entry, now)
            self._open.pop()
            if self._open:  # the enclosing phase runs again from now
                self._open[-1][1] = now
            self._memory[name] = memory_mib(self.device)

    def step_metrics(self) -> dict[str, float]:
        """``time/<phase>_s``, ``time/step_s``, ``mem/<phase>_mib`` (RSS or allocated) and, on GPU,
        ``mem/<phase>_reserved_mib`` and ``mem/<phase>_device_used_mib``; then reset for the next step."""
        out = {f"time/{name}_s": s for name, s in self._seconds.items()}
        out["time/step_s"] = time.perf_counter() - self._step_start
        for name, mem in self._memory.items():
            out[f"mem/{name}_mib"] = mem.get("rss", mem.get("allocated", 0.0))
            if "reserved" in mem:
                out[f"mem/{name}_reserved_mib"] = mem["reserved"]
                out[f"mem/{name}_device_used_mib"] = mem["device_used"]
        self._seconds, self._memory = {}, {}
        self._step_start = time.perf_counter()
        return out


def phase_table(metrics: dict, *, phases: Sequence[str] = TABLE_ORDER) -> str:
    """A small fixed-width table of the phases' time, share of the step, and memory."""
    step_s = metrics.get("time/step_s") or sum(metrics.get(f"time/{p}_s", 0.0) for p in phases) or 1.0
    mem_kind = "reserved" if any(k.endswith("_reserved_mib") for k in metrics) else "rss"
    lines = [f"{'phase':<10}{'time_s':>9}{'share':>8}{'mem_mib':>10}"
             + (f"{'reserved':>10}" if mem_kind == "reserved" else "")]
    for p in phases:
        if f"time/{p}_s" not in metrics:
            continue
        t = metrics[f"time/{p}_s"]
        row = f"{p:<10}{t:>9.3f}{100 * t / step_s:>7.1f}%{metrics.get(f'mem/{p}_mib', float('nan')):>10.1f}"
        if mem_kind == "reserved":
            row += f"{metrics.get(f'mem/{p}_reserved_mib', float('nan')):>10.1f}"
        lines.append(row)
    lines.append(f"{'step':<10}{step_s:>9.3f}{100.0:>7.1f}%")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Per-step statistics.


def reward_stats(rewards: Sequence[float], *, group_size: int) -> dict[str, float]:
    """Mean/std/min/max of ``(N*G,)`` rewards and the share of groups whose rewards are all equal
    (their GRPO advantages are zero: no learning signal)."""
    r = torch.as_tensor(list(rewards), dtype=torch.float64).reshape(-1, group_size)  # (N, G)
    flat = r.reshape(-1)
    flat_groups = (r.max(dim=1).values == r.min(dim=1).values).double().mean()
    return {"reward/mean": flat.mean().item(), "reward/std": flat.std(correction=0).item(),
            "reward/min": flat.min().item(), "reward/max": flat.max().item(),
            "reward/zero_adv_groups": flat_groups.item()}


def length_stats(lengths: Sequence[int], *, max_new_tokens: int) -> dict[str, float]:
    """Response lengths in tokens; ``truncated_frac`` = share that hit ``max_new_tokens``."""
    n = torch.as_tensor(list(lengths), dtype=torch.float64)
    return {"response_len/mean": n.mean().item(), "response_len/max": n.max().item(),
            "response_len/truncated_frac": (n >= max_new_tokens).double().mean().item()}


def reward_gain(values: Sequence[float], *, frac: float = 0.2) -> tuple[float, float, float]:
    """``(first, last, last - first)``: the mean of the first and of the last ``frac`` of the values."""
    vals = list(values)
    if not vals:
        raise ValueError("reward_gain needs at least one value")
    k = max(1, int(round(len(vals) * frac)))
    first, last = sum(vals[:k]) / k, sum(vals[-k:]) / k
    return first, last, last - first


def ascii_curve(values: Sequence[float], *, height: int = 8, width: int = 60) -> str:
    """A text plot of ``values`` (e.g. mean reward per step) for terminals and logs."""
    vals = list(values)
    if not vals:
        return "(no values)"
    if len(vals) > width:  # average into `width` buckets
        vals = [sum(b) / len(b) for b in (vals[i * len(vals) // width:(i + 1) * len(vals) // width]
                                          for i in range(width)) if b]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    rows = []
    for level in range(height - 1, -1, -1):
        cut = lo + span * level / (height - 1 if height > 1 else 1)
        label = f"{cut:7.3f} |" if level in (0, height - 1) else "        |"
        rows.append(label + "".join("*" if v >= cut - 1e-12 else " " for v in vals))
    rows.append("        +" + "-" * len(vals))
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Writers.


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    return value


class MetricsLogger:
    """Writes one JSON object per step to ``<run_dir>/metrics.jsonl``, TensorBoard scalars to
    ``<run_dir>/tb``, and drives a tqdm progress bar, all on rank 0 only (other ranks: no-ops).

    ``start_step`` > 0 (a resumed run) first drops JSONL lines at or after it, so the file
    ends up as if the run had never stopped. The dropped lines are not lost: they are appended
    to ``<run_dir>/metrics.replaced.jsonl`` (a resumed step can then be compared with the step
    it replaced: equal, for a bitwise resume).
    """

    def __init__(self, run_dir: str, *, rank: int = 0, total_steps: int, start_step: int = 0, jsonl: bool = True,
                 tensorboard: bool = False, progress: bool = True, stream=None):
        self.enabled = rank == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = self._tb = self._bar = None
        self.stream = stream or console.stderr()  # the console, also when this rank's output goes to its log
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if jsonl:
            self._truncate_from(start_step)
            self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: optional (logging.tensorboard)

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step or None)
        if progress:
            from tqdm import tqdm  # lazy: optional (logging.progress)

            self._bar = tqdm(total=total_steps, initial=start_step, desc="grpo", unit="step", file=self.stream,
                             dynamic_ncols=True, mininterval=0.5)

    def _truncate_from(self, start_step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", -1) < start_step]
        if len(kept) < len(lines):
            with open(os.path.join(os.path.dirname(self.path), "metrics.replaced.jsonl"), "a") as f:
                f.writelines(line for line in lines if json.loads(line).get("step", -1) >= start_step)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict, *, summary_keys: Iterable[str] = ("reward/mean", "loss")) -> None:
        """Record ``metrics`` (floats or 0-d tensors) for ``step``."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=step)
        if self._bar is not None:
            self._bar.set_postfix({k.replace("/mean", ""): f"{row[k]:.4g}"
                                   for k in summary_keys if isinstance(row.get(k), (int, float))}, refresh=False)
            if step + 1 >= self._bar.total:
                # The last step: draw the final line exactly once. A plain update() may draw it,
                # then every later print() would redraw it under its text, and close() once more
                # (three copies in any log that keeps carriage returns). Closing now draws it
                # once; later prints are plain lines.
                self._bar.n = step + 1
                self._bar.close()
                self._bar = None
            else:
                self._bar.update(step + 1 - self._bar.n)  # steps between logged rows count too

    def print(self, text: str) -> None:
        """A human line from rank 0 that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        self._file = self._tb = self._bar = None


def read_metrics(path: str) -> list[dict]:
    """All rows of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
