"""``megatron-rl plot RUN_DIR``: one PNG of a run's curves, written next to its ``metrics.jsonl``.

Four panels, one x axis (the step):

- **reward**: ``reward/mean`` with its min..max band, and every held-out ``eval/*`` figure the
  run logged (pass@1, mean reward, ...) as markers at the steps it ran;
- **loss**: ``loss`` (and ``kl`` when the KL term was on);
- **mismatch**: ``mismatch/abs_mean`` and ``mismatch/abs_max``, |logp_rollout - logp_train|,
  on a log scale (fp32 runs sit near 1e-7, bf16 runs near 1e-2);
- **phase time**: the seconds of every phase (``time/<phase>_s``) stacked per step, with the
  step's wall time as a line.

matplotlib is an optional extra (``pip install 'megatron_rl[metrics]'``). The trainer writes the
plot at the end of a run (:func:`end_of_run`): without matplotlib it prints one line saying so
and how to fix it, and the run still succeeds (its metrics are all in ``metrics.jsonl``; the
plot can be drawn later). ``megatron-rl plot`` without matplotlib fails with that line.

Usage::

    megatron-rl plot runs/demo                  # -> runs/demo/metrics.png
    megatron-rl plot runs/demo --out curve.png
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from megatron_rl.metrics import TABLE_ORDER, read_metrics

PNG_NAME = "metrics.png"
MISSING = ("matplotlib is not installed; fix: pip install 'megatron_rl[metrics]' (matplotlib==3.11.2), "
           "then megatron-rl plot {run_dir}")


class PlotError(RuntimeError):
    """Nothing to plot, or no matplotlib: one line naming the cause and the fix."""


@dataclass
class Series:
    """One curve: the steps where a metric was logged and its values there (None/NaN dropped)."""

    name: str
    steps: list = field(default_factory=list)
    values: list = field(default_factory=list)


def series(rows: list[dict], key: str) -> Series:
    out = Series(key)
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in row:
            out.steps.append(row["step"])
            out.values.append(float(v))
    return out


def phase_keys(rows: list[dict]) -> list[str]:
    """``time/<phase>_s`` keys in step order (the phase table's order, then any other phase)."""
    seen = {k for row in rows for k in row if k.startswith("time/") and k.endswith("_s") and k != "time/step_s"}
    known = [f"time/{p}_s" for p in TABLE_ORDER if f"time/{p}_s" in seen]
    return known + sorted(seen - set(known))


def eval_keys(rows: list[dict]) -> list[str]:
    """Every held-out evaluation figure the run logged (``eval/...``), except its time and memory."""
    return sorted({k for row in rows for k in row if k.startswith("eval/") and not k.endswith(("_s", "_mib"))})


def _draw_reward(ax, rows: list[dict]) -> None:
    mean, lo, hi = series(rows, "reward/mean"), series(rows, "reward/min"), series(rows, "reward/max")
    if mean.steps:
        ax.plot(mean.steps, mean.values, label="reward mean (rollout)", color="C0")
    if lo.steps and lo.steps == hi.steps:
        ax.fill_between(lo.steps, lo.values, hi.values, color="C0", alpha=0.15, label="reward min..max")
    for i, key in enumerate(eval_keys(rows)):
        s = series(rows, key)
        ax.plot(s.steps, s.values, marker="o", linestyle="--", color=f"C{i + 1}", label=key)
    ax.set_ylabel("reward")
    ax.legend(loc="best", fontsize=7)


def _draw_loss(ax, rows: list[dict]) -> None:
    for key, color in (("loss", "C3"), ("kl", "C4")):
        s = series(rows, key)
        if s.steps and (key == "loss" or any(v != 0 for v in s.values)):
            ax.plot(s.steps, s.values, label=key, color=color)
    ax.set_ylabel("loss")
    ax.legend(loc="best", fontsize=7)


def _draw_mismatch(ax, rows: list[dict]) -> None:
    drawn = []
    for key, color in (("mismatch/abs_mean", "C5"), ("mismatch/abs_max", "C6")):
        s = series(rows, key)
        if s.steps:
            ax.plot(s.steps, s.values, label=key, color=color)
            drawn += s.values
    if drawn and all(v > 0 for v in drawn):
        ax.set_yscale("log")
    ax.set_ylabel("|dlogp| rollout vs train")
    ax.legend(loc="best", fontsize=7)


def _draw_phases(ax, rows: list[dict]) -> None:
    steps = [r["step"] for r in rows if "step" in r and any(k in r for k in phase_keys(rows))]
    bottom = [0.0] * len(steps)
    for i, key in enumerate(phase_keys(rows)):
        by_step = {r["step"]: r.get(key) or 0.0 for r in rows if "step" in r}
        heights = [float(by_step.get(s, 0.0)) for s in steps]
        ax.bar(steps, heights, bottom=bottom, width=0.8, color=f"C{i % 10}", label=key[5:-2])
        bottom = [b + h for b, h in zip(bottom, heights)]
    wall = series(rows, "time/step_s")
    if wall.steps:
        ax.plot(wall.steps, wall.values, color="black", linewidth=1, label="step (wall)")
    ax.set_ylabel("seconds per step")
    ax.set_xlabel("step")
    ax.legend(loc="upper right", fontsize=7, ncol=4)


def write_plot(rows: list[dict], *, path: str, title: str = "") -> str:
    """Draw the four panels of ``rows`` (metrics.jsonl rows) into the PNG ``path`` (atomically)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotError(MISSING.format(run_dir=os.path.dirname(path) or "."))
    if not any("step" in r for r in rows):
        raise PlotError(f"no metric rows to plot for {path}; fix: run at least one step with logging.jsonl=true")
    import matplotlib  # lazy: an optional extra, and slow to import

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # lazy: as above
    from matplotlib.ticker import MaxNLocator  # lazy: as above

    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True, dpi=80)
    try:
        for ax, draw in zip(axes, (_draw_reward, _draw_loss, _draw_mismatch, _draw_phases)):
            draw(ax, rows)
            ax.grid(alpha=0.3)
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        fig.suptitle(title or "megatron_rl run")
        fig.tight_layout()
        tmp = f"{path}.tmp.png"
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def plot_run(run_dir: str, *, out: Optional[str] = None) -> str:
    """Plot ``<run_dir>/metrics.jsonl`` into ``out`` (default ``<run_dir>/metrics.png``); returns the path."""
    src = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(src):
        raise PlotError(f"{src} does not exist; fix: pass the run directory of a run (its logging.run_dir)")
    return write_plot(read_metrics(src), path=out or os.path.join(run_dir, PNG_NAME),
                      title=os.path.basename(os.path.normpath(run_dir)))


def end_of_run(run_dir: str) -> str:
    """The trainer's last line: the PNG's path, or (no matplotlib, no rows) why there is none.
    Only a missing matplotlib or an empty metrics file is turned into a line; anything else raises."""
    try:
        return f"plot: {plot_run(run_dir)}"
    except PlotError as e:
        return f"plot: not written: {e}"


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-rl plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory holding metrics.jsonl (logging.run_dir of the run)")
    ap.add_argument("--out", default=None, help=f"PNG path (default: RUN_DIR/{PNG_NAME})")
    args = ap.parse_args(argv)
    try:
        print(plot_run(args.run_dir, out=args.out))
    except PlotError as e:
        print(f"plot error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
