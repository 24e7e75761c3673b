"""Benchmark: one GRPO step of the tiny CPU demo, by phase, and the reward it gains.

Launches the real job (``megatron-rl train --config configs/tiny_cpu.yaml``, world 4: megatron
TP2 x PP2 + vLLM TP1 x 4) under torchrun, then reads the trainer's own per-phase timings from
its metrics.jsonl. Step 0 is excluded from the timings (it compiles vLLM's log-prob kernel);
the reward curve uses every step.

    .venv/bin/python benchmarks/grpo_step.py [--quick] [--steps N] [--settings demo,long] [key=value ...]

Each setting runs twice in one benchmark run: the **baseline**, the way users run today
(``train.shared_prefix=false``: each response its own ``[P, R_i]`` row, and a sync that gathers
every full HF tensor on every rank and reloads it into vLLM with vLLM's own ``load_weights``;
see :class:`GatherSync`), then **ours** (shared-prefix packing, shard-to-shard sync). Two
settings: the demo's (``demo``), and a long-prompt one (``long``: 200-token prompts, 16-token
responses, G=8), where shared prefix matters.

Final line: {"bench": "grpo_step", "ratio", "settings": {name: {"baseline": {...}, "ours": {...},
"ratio"}}}, each side with step_s, rollout_s, train_s, sync_s, release_resume_s,
overhead_fraction and the reward figures; ``ratio`` = baseline step / our step (the headline
"ratio" is the demo setting's).
"""
import argparse
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 steps of the demo's shape (start-up dominates)")
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default 10; quick: 4)")
    ap.add_argument("--settings", default="demo,long", help="comma-separated: demo, long")
    ap.add_argument("--run-dir", default=os.path.join(REPO, "runs", "bench", "grpo_step"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    return ap.parse_args()


class GatherSync:
    """The baseline sync (what veRL/OpenRLHF-style colocated stacks do): every canonical tensor is
    gathered whole from the training shards onto rank 0, broadcast to every rank, and handed to
    vLLM's ``load_weights`` as a full HF tensor (vLLM slices its own shard)."""

    def __init__(self, job):
        from megatron_rl.parallel.grid import RankGrid
        from megatron_rl.resharding.layout import ModelShape
        from megatron_rl.trainer import sync_source_layout

        cfg, p = job.cfg, job.cfg.parallel
        from transformers import AutoConfig

        shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(cfg.model.hf_path))
        grid = RankGrid(world_size=job.world, tp=p.tp, pp=p.pp, cp=p.cp)
        self.job, self.shape = job, shape
        self.layout = sync_source_layout(job.eng.model, shape, grid, cfg.model.make_vocab_size_divisible_by)

    def sync(self):
        import torch
        import torch.distributed as dist

        from megatron_rl.checkpoint.megatron import local_params
        from megatron_rl.parallel import collectives as coll
        from megatron_rl.resharding.executor import run_plan
        from megatron_rl.resharding.layout import hf_layout
        from megatron_rl.resharding.planner import make_plan
        from megatron_rl.resharding.transport import TorchP2P

        params = local_params(self.job.eng.model[0])
        dtype, device = next(iter(params.values())).dtype, coll.backend_device()
        # Gather every canonical tensor whole on rank 0 (the plan to the HF layout), then broadcast.
        plan = make_plan(self.layout, dst=hf_layout(self.shape, rank=0), bucket_bytes=self.job.cfg.sync.bucket_bytes,
                         elem_size=torch.empty((), dtype=dtype).element_size())
        got = {}
        run_plan(plan, self.job.rank, get_src=params.__getitem__, deliver=got.__setitem__, transport=TorchP2P(),
                 dst_dtype=dtype, device=device)
        full = []
        for name, shape in self.layout.canon_shapes.items():
            t = got.pop(name, None)
            t = t if t is not None else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(t, src=0)
            full.append((name, t))
        self.job.rollout.update_weights(full)


def run_as_job(kind: str, argv: list) -> int:
    """Under torchrun: the trainer's own CLI, with the baseline sync swapped in for ``baseline``."""
    import dataclasses

    from megatron_rl import cli, trainer

    if kind == "baseline":
        setup = trainer.setup
        trainer.setup = lambda cfg, *, hf_config: (lambda job: dataclasses.replace(job, sync=GatherSync(job)))(
            setup(cfg, hf_config=hf_config))
    return cli.main(["train", *argv])


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


SETTINGS = {
    "demo": [],
    "long": ["data.max_prompt_len=224", "rollout.max_model_len=256", "rollout.max_new_tokens=16",
             "algorithm.group_size=8", "data.prompts_per_step=4"],
}


def long_prompts(path: str, n: int = 64) -> str:
    """The digits task with ~200-character prompts (the tokenizer is character-level)."""
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            body = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(190))
            f.write(json.dumps({"prompt": f"digits {body}:"}) + "\n")
    return path


def run_one(args, kind: str, setting: str, steps: int) -> dict:
    from _launch import launch_env, run_job, tiny_model_paths, torchrun_cmd
    from megatron_rl.metrics import read_metrics, reward_gain

    run_dir = os.path.join(args.run_dir, f"{setting}-{kind}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    extra = [f"data.dataset={long_prompts(os.path.join(run_dir, 'prompts.jsonl'))}"] if setting == "long" else []
    overrides = [*extra, f"model.hf_path={tiny_model_paths()['llama']}", f"train.steps={steps}", "checkpoint.dir=null",
                 f"logging.run_dir={run_dir}", "logging.progress=false", "logging.phase_table=false",
                 *SETTINGS[setting], *(["train.shared_prefix=false"] if kind == "baseline" else []), *args.overrides]
    env = launch_env()
    cmd = torchrun_cmd(4, os.path.abspath(__file__), "--as-job", kind, "--config", "configs/tiny_cpu.yaml", *overrides)
    wall = run_job(cmd, env=env, timeout=args.timeout, what=f"grpo_step: the {setting}/{kind} job")
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    timed = rows[1:] or rows  # step 0 compiles vLLM's log-prob kernel
    ph = {p: mean(r[f"time/{p}_s"] for r in timed) for p in ("rollout", "release", "train", "sync", "resume")}
    step_s = mean(r["time/step_s"] for r in timed)
    first, last, gain = reward_gain([r["reward/mean"] for r in rows])
    print(f"{setting}/{kind}: {len(rows)} steps, {wall:.1f} s wall incl. start-up; timings over steps 1..{rows[-1]['step']}")
    for p, v in ph.items():
        print(f"  {p:8s} {v:8.3f} s  {100 * v / max(step_s, 1e-9):5.1f}%")
    print(f"  step     {step_s:8.3f} s   reward first 20% {first:.4f} last 20% {last:.4f} gain {gain:+.4f}")
    overhead = (ph["sync"] + ph["release"] + ph["resume"]) / max(step_s, 1e-9)
    return {"step_s": round(step_s, 4), "rollout_s": round(ph["rollout"], 4), "train_s": round(ph["train"], 4),
            "sync_s": round(ph["sync"], 4), "release_resume_s": round(ph["release"] + ph["resume"], 4),
            "overhead_fraction": round(overhead, 4), "reward_first": round(first, 4), "reward_last": round(last, 4),
            "reward_gain": round(gain, 4)}


def main():
    args = parse_args()
    steps = args.steps or (4 if args.quick else 10)
    out = {}
    for setting in args.settings.split(","):
        base, ours = run_one(args, "baseline", setting, steps), run_one(args, "ours", setting, steps)
        out[setting] = {"baseline": base, "ours": ours, "ratio": round(base["step_s"] / ours["step_s"], 3)}
        print(f"{setting}: baseline step {base['step_s']:.3f} s, ours {ours['step_s']:.3f} s, ratio {out[setting]['ratio']}")
    head = out.get("demo", next(iter(out.values())))
    print(json.dumps({"bench": "grpo_step", "ratio": head["ratio"], "settings": out}))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--as-job":
        sys.path.insert(0, REPO)
        sys.exit(run_as_job(sys.argv[2], sys.argv[3:]))
    main()
