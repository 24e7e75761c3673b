"""Benchmark: a cold vLLM engine start vs release + resume, and how much memory really returns.

One process run (re-launched under torchrun when started plainly): build the engine (cold
start: model load + KV allocation), then release/resume the KV cache and the weights (offload,
host copy in a file) and time the resume; finally 50 release(both, discard) -> resume ->
sync (load_shards from a host copy) -> generate cycles, checking outputs and RSS growth.

    .venv/bin/python benchmarks/rollout_lifecycle.py [--quick] [--nproc 1]

The whole cycle is timed: release (with the offload write), resume, and the first generate after
it (which pays the page faults of the KV pages that madvise returned), against the cold path: an
engine start and its first generate. ``"ratio"`` = cold cycle / our cycle.

Final line: {"bench": "rollout_lifecycle", "cold_start_s", "cold_first_generate_s", "release_s",
"resume_s", "first_generate_s", "cycle_s", "ratio", "resume_over_cold_start",
"kv_bytes_freed_fraction", "weight_bytes_freed_fraction", "rss_growth_50_cycles"}.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller KV cache; finishes within a minute")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (vLLM TP = nproc)")
    ap.add_argument("--kv-mib", type=int, default=None, help="KV cache per rank (MiB)")
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--run-dir", default=os.path.join(REPO, "runs", "rollout", "bench"))
    return ap.parse_args()


def relaunch(args) -> int:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(29500 + os.getpid() % 1000), __file__, *sys.argv[1:]]
    return subprocess.call(cmd, env=env, cwd=REPO)


def build_model(run_dir: str) -> str:
    from megatron_rl.models.tiny import make_tiny_model

    path = os.path.join(run_dir, "model-qwen3-53m")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        make_tiny_model(path, family="qwen3", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                        vocab_size=32000)
    return path


def cycles(eng, prompts, greedy, ref, n: int, say) -> float:
    from megatron_rl.rollout.cpu_memory import rss_bytes

    shards = eng.weights.read_shards()  # the host copy a weight sync would deliver
    eng.set_weights_release("discard")
    rss = []
    for i in range(n):
        eng.release(["kv_cache", "weights"])
        eng.resume(["weights"])
        eng.begin_weight_update()
        eng.load_shards(shards.items())
        eng.end_weight_update()
        eng.resume(["kv_cache"])
        if [g.tokens for g in eng.generate(prompts, sampling=greedy)] != ref:
            raise SystemExit(f"cycle {i}: greedy generations changed")
        rss.append(rss_bytes())
    growth = (rss[-1] - rss[0]) / rss[0]
    say(f"{n} cycles: RSS {rss[0] / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB ({growth:+.2%}), outputs identical")
    return growth


def main(args):
    import torch
    import torch.distributed as dist

    from megatron_rl.config import RolloutConfig
    from megatron_rl.rollout.base import Sampling
    from megatron_rl.parallel import rollout_topology
    from megatron_rl.rollout.vllm_engine import VllmEngine

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    say = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
    path = build_model(args.run_dir) if rank == 0 else None
    dist.barrier()
    path = path or os.path.join(args.run_dir, "model-qwen3-53m")
    kv_mib = args.kv_mib or (256 if args.quick else 1024)
    cfg = RolloutConfig(tp=args.nproc, kv_cache_bytes=kv_mib << 20, max_model_len=512, weights_release="offload")
    import vllm  # noqa: F401 - the module import is a one-off, not part of an engine start

    t0 = time.perf_counter()
    eng = VllmEngine(path, cfg=cfg, topo=rollout_topology(rollout_tp=cfg.tp), run_dir=args.run_dir)
    cold = time.perf_counter() - t0
    say(f"cold start (model load + {kv_mib} MiB KV): {cold:.2f} s")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (160,), generator=g).tolist() for _ in range(4)]
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    t0 = time.perf_counter()
    ref = [x.tokens for x in eng.generate(prompts, sampling=greedy)]
    cold_first_gen = time.perf_counter() - t0  # the cold engine's first generate (its first page faults)
    t0 = time.perf_counter()
    kv = eng.release(["kv_cache"])
    w = eng.release(["weights"])  # offload: includes writing the host copy
    release = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng.resume(["weights", "kv_cache"])
    resume = time.perf_counter() - t0
    t0 = time.perf_counter()
    same = [x.tokens for x in eng.generate(prompts, sampling=greedy)] == ref
    first_gen = time.perf_counter() - t0  # pays the faults of the KV pages madvise returned
    kv_frac = (kv.extra["rss_before"] - kv.rss) / kv.extra["kv_cache_bytes_before"]
    w_frac = (w.extra["rss_before"] - w.rss) / w.extra["weight_bytes_before"]
    say(f"KV release: {kv.extra['kv_cache_bytes_before'] / 2**20:.0f} MiB held, RSS fell {kv_frac:.1%} of it")
    say(f"weight release (offload): {w.extra['weight_bytes_before'] / 2**20:.0f} MiB held, RSS fell {w_frac:.1%}")
    cycle = release + resume + first_gen
    say(f"our cycle: release {release:.3f} s (incl. the offload write) + resume {resume:.3f} s + first generate "
        f"{first_gen:.3f} s = {cycle:.3f} s; outputs identical: {same}")
    say(f"cold cycle (what a restart costs): engine start {cold:.3f} s + first generate {cold_first_gen:.3f} s "
        f"= {cold + cold_first_gen:.3f} s")
    growth = cycles(eng, prompts, greedy, ref, args.cycles, say)
    out = {"bench": "rollout_lifecycle", "cold_start_s": round(cold, 3),
           "cold_first_generate_s": round(cold_first_gen, 3), "release_s": round(release, 3),
           "resume_s": round(resume, 3), "first_generate_s": round(first_gen, 3), "cycle_s": round(cycle, 3),
           "ratio": round((cold + cold_first_gen) / cycle, 3), "resume_over_cold_start": round(resume / cold, 4), "kv_bytes_freed_fraction": round(kv_frac, 4),
           "weight_bytes_freed_fraction": round(w_frac, 4), "rss_growth_50_cycles": round(growth, 4)}
    if not same:
        raise SystemExit("greedy generations changed after resume")
    dist.barrier()
    say(json.dumps(out))


if __name__ == "__main__":
    a = parse_args()
    if "RANK" not in os.environ:
        sys.exit(relaunch(a))
    sys.path.insert(0, REPO)
    main(a)
