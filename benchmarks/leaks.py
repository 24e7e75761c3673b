"""Benchmark: nothing leaks over a long run (RSS, file descriptors, threads, /dev/shm segments).

Launches the tiny CPU demo (``megatron-rl train --config configs/tiny_cpu.yaml``, world 4:
megatron TP2 x PP2 + vLLM TP1 x 4) for 200 steps at the smallest settings that still run every
phase each step (rollout, release, train, resume, sync, resume; a checkpoint every 25 steps),
with ``MEGATRON_RL_SAMPLE_RESOURCES=1``: every step the trainer's metrics then carry each rank's
RSS, open fds (/proc/self/fd), threads (/proc/self/task) and /dev/shm segments it maps or holds
(``res/<name>/rank<r>``, see megatron_rl/runtime/resources.py). A quantity is flat when, on
every rank, it stays within ``--tol`` (5%) of its value at ``--from-step`` (20) until the end.

    .venv/bin/python benchmarks/leaks.py [--steps 200] [--from-step 20] [key=value ...]

Final line: {"bench": "leaks", "steps", "world", "from_step", "step20": {name: [per rank]},
"end": {name: [per rank]}, "max_rel_drift": {name}, "ratio": {name: max over ranks of end/step20},
"flat": {name: bool}, "ok", "wall_s"}. Several minutes on 2 cores: a benchmark, not a test.
"""
import argparse
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

SMALL = ["algorithm.group_size=2", "data.prompts_per_step=2", "rollout.max_new_tokens=4",
         "train.micro_batch_groups=2", "checkpoint.save_every=25", "checkpoint.keep=1", "logging.progress=false",
         "logging.phase_table=false", "logging.log_every=1"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--from-step", type=int, default=20, help="the reference step (start-up growth is before it)")
    ap.add_argument("--tol", type=float, default=0.05, help="relative drift allowed from --from-step on")
    ap.add_argument("--run-dir", default=os.path.join(REPO, "runs", "bench", "leaks"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    return ap.parse_args()


def drift(series: list) -> float:
    """Largest |x - x0| / x0 over the series (x0 its first value; absolute when x0 is 0)."""
    x0 = series[0]
    return max(abs(x - x0) for x in series) / (abs(x0) if x0 else 1.0)


def analyse(rows: list, *, from_step: int, tol: float) -> dict:
    """Per-quantity verdict from the metrics rows (``res/<name>/rank<r>`` keys)."""
    from megatron_rl.runtime.resources import NAMES

    rows = [r for r in rows if r["step"] >= from_step]
    world = len([k for k in rows[0] if k.startswith(f"res/{NAMES[0]}/rank")])
    out = {"step20": {}, "end": {}, "max_rel_drift": {}, "ratio": {}, "flat": {}}
    for name in NAMES:
        per_rank = [[r[f"res/{name}/rank{k}"] for r in rows] for k in range(world)]
        out["step20"][name] = [s[0] for s in per_rank]
        out["end"][name] = [s[-1] for s in per_rank]
        out["max_rel_drift"][name] = round(max(drift(s) for s in per_rank), 4)
        out["ratio"][name] = round(max(s[-1] / s[0] if s[0] else (1.0 if not s[-1] else float("inf"))
                                       for s in per_rank), 4)
        out["flat"][name] = out["max_rel_drift"][name] <= tol
    out["world"] = world
    return out


def main():
    from _launch import launch_env, run_job, tiny_model_paths, torchrun_cmd
    from megatron_rl.metrics import read_metrics
    from megatron_rl.runtime.resources import ENV

    args = parse_args()
    shutil.rmtree(args.run_dir, ignore_errors=True)
    overrides = [f"model.hf_path={tiny_model_paths()['llama']}", f"train.steps={args.steps}",
                 f"checkpoint.dir={os.path.join(args.run_dir, 'ckpt')}", f"logging.run_dir={args.run_dir}",
                 *SMALL, *args.overrides]
    env = launch_env(**{ENV: "1"})
    cmd = torchrun_cmd(4, os.path.join(REPO, "megatron_rl", "cli.py"), "train",
                       "--config", "configs/tiny_cpu.yaml", *overrides)
    wall = run_job(cmd, env=env, timeout=args.timeout, what="leaks: the training job")
    rows = read_metrics(os.path.join(args.run_dir, "metrics.jsonl"))
    got = analyse(rows, from_step=args.from_step, tol=args.tol)
    for name, flat in got["flat"].items():
        print(f"{name:8s} step {args.from_step}: {got['step20'][name]}  end: {got['end'][name]}  "
              f"max drift {100 * got['max_rel_drift'][name]:.2f}%  {'flat' if flat else 'GROWS'}")
    print(json.dumps({"bench": "leaks", "steps": len(rows), "from_step": args.from_step, **got,
                      "ok": all(got["flat"].values()), "wall_s": round(wall, 1)}))


if __name__ == "__main__":
    main()
