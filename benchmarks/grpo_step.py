"""Benchmark: one GRPO step of the tiny CPU demo, by phase, and the reward it gains.

Launches the real job (``megatron-rl train --config configs/tiny_cpu.yaml``, world 4: megatron
TP2 x PP2 + vLLM TP1 x 4) under torchrun, then reads the trainer's own per-phase timings from
its metrics.jsonl. Step 0 is excluded from the timings (it compiles vLLM's log-prob kernel);
the reward curve uses every step.

    .venv/bin/python benchmarks/grpo_step.py [--quick] [--steps N] [key=value ...]

Final line: {"bench": "grpo_step", "step_s", "rollout_s", "train_s", "sync_s", "release_resume_s",
"overhead_fraction", "reward_first", "reward_last", "reward_gain"} where overhead_fraction =
(sync + release + resume) / step and reward_gain = mean reward of the last 20% of steps minus
that of the first 20%.
"""
import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 steps of the demo's shape (start-up dominates)")
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps (default 20; quick: 4)")
    ap.add_argument("--run-dir", default=os.path.join(REPO, "runs", "bench", "grpo_step"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    return ap.parse_args()


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def main():
    from _launch import free_port, run_group, tiny_model_paths
    from megatron_rl.metrics import read_metrics, reward_gain

    args = parse_args()
    steps = args.steps or (4 if args.quick else 20)
    shutil.rmtree(args.run_dir, ignore_errors=True)
    overrides = [f"model.hf_path={tiny_model_paths()['llama']}", f"train.steps={steps}", "checkpoint.dir=null",
                 f"logging.run_dir={args.run_dir}", "logging.progress=false", "logging.phase_table=false"]
    overrides += args.overrides
    env = dict(os.environ, PYTHONPATH=REPO, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
               TORCHINDUCTOR_CACHE_DIR=os.path.join(REPO, "runs", ".cache", "inductor"),
               VLLM_CACHE_ROOT=os.path.join(REPO, "runs", ".cache", "vllm"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), os.path.join(REPO, "megatron_rl", "cli.py"), "train",
           "--config", "configs/tiny_cpu.yaml", *overrides]
    t0 = time.time()
    proc = run_group(cmd, env=env, timeout=args.timeout)
    wall = time.time() - t0
    if proc.returncode != 0:
        print("\n".join((proc.stdout + proc.stderr).splitlines()[-40:]), file=sys.stderr)
        sys.exit(f"grpo_step: the training job exited {proc.returncode}")
    rows = read_metrics(os.path.join(args.run_dir, "metrics.jsonl"))
    timed = rows[1:] or rows  # step 0 compiles vLLM's log-prob kernel
    ph = {p: mean(r[f"time/{p}_s"] for r in timed) for p in ("rollout", "release", "train", "sync", "resume")}
    step_s = mean(r["time/step_s"] for r in timed)
    first, last, gain = reward_gain([r["reward/mean"] for r in rows])
    print(f"job: {len(rows)} steps, {wall:.1f} s wall incl. start-up; timings over steps 1..{rows[-1]['step']}")
    for p, v in ph.items():
        print(f"  {p:8s} {v:8.3f} s  {100 * v / max(step_s, 1e-9):5.1f}%")
    print(f"  step     {step_s:8.3f} s")
    print("reward per step: " + " ".join(f"{r['reward/mean']:.3f}" for r in rows))
    print(f"reward first 20%: {first:.4f}  last 20%: {last:.4f}  gain: {gain:+.4f}")
    overhead = (ph["sync"] + ph["release"] + ph["resume"]) / max(step_s, 1e-9)
    print(json.dumps({"bench": "grpo_step", "step_s": round(step_s, 4), "rollout_s": round(ph["rollout"], 4),
                      "train_s": round(ph["train"], 4), "sync_s": round(ph["sync"], 4),
                      "release_resume_s": round(ph["release"] + ph["resume"], 4),
                      "overhead_fraction": round(overhead, 4), "reward_first": round(first, 4),
                      "reward_last": round(last, 4), "reward_gain": round(gain, 4)}))


if __name__ == "__main__":
    main()
