"""Benchmark: direct shard-to-shard weight sync vs gather-to-full + vLLM checkpoint reload.

Megatron TP=4 (world 4) -> vLLM TP=2 x 2 replicas, one SPMD run, the same model and engine:
- baseline (what RL stacks do today): per parameter, all-gather the TP shards to full HF
  tensors on every rank (PP would add a broadcast), then vLLM's layerwise checkpoint-format
  reload (``worker.reload_weights(..., is_checkpoint_format=True)``) slices them per rank;
- ours: the cached plan, bucketed point-to-point, shards into the engine's receiver.
Both end with the engine holding the same weights (checked: checksums, and in --quick a
bitwise read-back of every vLLM parameter after each path).

    python benchmarks/weight_sync.py --quick        # < 1 min on 2 cores
    python benchmarks/weight_sync.py                # ~600 MB model

Prints per-phase lines, then one JSON line (see KEYS).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
KEYS = ["bench", "bytes_moved", "lower_bound", "bytes_ratio_to_lower_bound", "baseline_bytes_moved",
        "speedup_vs_gather", "ratio", "peak_extra_bytes", "bucket_bytes", "peak_extra_over_bucket"]
SIZES = {  # llama-style, untied, head_dim 64 (vLLM-CPU attention), kv heads divisible by t_m=4
    "quick": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=1024,
                  num_hidden_layers=4, vocab_size=8000, bucket=4 << 20, repeats=2),
    "full": dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, intermediate_size=2816,
                 num_hidden_layers=8, vocab_size=32000, bucket=64 << 20, repeats=3),
}


def make_model_dir(path: str, size: dict) -> str:
    """Config + tokenizer only: vLLM starts with load_format=dummy, Megatron initialises randomly."""
    from megatron_rl.models.tiny import build_tokenizer, tiny_hf_config

    shape = {k: v for k, v in size.items() if k not in ("bucket", "repeats", "num_key_value_heads")}
    cfg = tiny_hf_config("llama", tied=False, **shape)
    cfg.num_key_value_heads = size["num_key_value_heads"]
    cfg.head_dim = size["hidden_size"] // size["num_attention_heads"]
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


class TimedEngine:
    """Receiver proxy over the rollout engine that times the engine's side (copies, vLLM packing)."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0

    def shard_shapes(self):
        return {n: s.shape for n, s in self.engine.weights.slots.items()}

    def _timed(self, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        self.seconds += time.perf_counter() - t
        return out

    def begin_weight_update(self):
        self._timed(self.engine.begin_weight_update)

    def load_shards(self, shards, *, donate=False):
        self._timed(self.engine.load_shards, shards, donate=donate)

    def end_weight_update(self):
        self._timed(self.engine.end_weight_update)  # also resets the prefix cache


def gather_to_hf(params, layout, *, tp_group, tp: int, clock: dict):
    """Yield full HF tensors: all-gather each Megatron parameter over TP, then un-fuse it."""
    import torch
    import torch.distributed as dist

    for name, lt_list in layout:
        local = params[name].detach()
        t0 = time.perf_counter()
        flat = torch.empty((tp * local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype)  # (tp*rows, ...)
        dist.all_gather_into_tensor(flat, local.contiguous(), group=tp_group)
        full = flat.view((tp,) + tuple(local.shape))  # (tp, *shard)
        clock["bytes"] += (tp - 1) * local.numel() * local.element_size()
        out = unfuse(full, lt_list, canon_shapes=layout.canon_shapes)
        clock["gather"] += time.perf_counter() - t0
        yield from out.items()


def unfuse(stack, lt_list, *, canon_shapes: dict) -> dict:
    """Full HF tensors from the gathered shards ``stack[r]`` of one parameter, laid out as ``lt_list[r]``."""
    import torch

    from megatron_rl.resharding.layout import disassemble

    out = {}

    def write(canon, dim, start, run):
        t = out.setdefault(canon, torch.empty(canon_shapes[canon], dtype=run.dtype))
        t.narrow(dim, start, run.shape[dim]).copy_(run)
    for r, lt in enumerate(lt_list):
        disassemble(lt, stack[r], write)
    return out


class _GatherOrder(list):
    """[(megatron name, [LocalTensor per tp rank])] with the canonical shapes attached."""

    canon_shapes: dict


def gather_order(shape, grid):
    from megatron_rl.resharding.layout import megatron_layout

    lay = megatron_layout(shape, grid)
    order = _GatherOrder((n, [lay.ranks[r][n] for r in range(grid.tp)]) for n in lay.ranks[0])
    order.canon_shapes = lay.canon_shapes
    return order


def worker(args):
    import torch
    import torch.distributed as dist

    from megatron_rl.config import ParallelConfig
    from megatron_rl.models import build_gpt
    from megatron_rl.parallel import init_distributed
    from megatron_rl.resharding.layout import ModelShape, megatron_layout
    from megatron_rl.resharding.sync import WeightSync
    from megatron_rl.resharding.vllm_layout import vllm_layout
    from transformers import AutoConfig

    size = SIZES["quick" if args.quick else "full"]
    hf_config = AutoConfig.from_pretrained(args.model_dir)
    parallel = ParallelConfig(tp=4, pp=1, timeout_s=600)
    topo = init_distributed(parallel, rollout_tp=2)
    grid, rank, world = topo.grid, topo.rank, topo.world_size
    chunks = build_gpt(hf_config, parallel=parallel, topo=topo)
    from megatron.core import parallel_state as ps

    from megatron_rl.config import RolloutConfig
    from megatron_rl.rollout.vllm_engine import VllmEngine

    rollout = RolloutConfig(tp=2, kv_cache_bytes=16 << 20, max_model_len=128, load_format="dummy")
    vengine = VllmEngine(args.model_dir, cfg=rollout, topo=topo, run_dir=args.out)
    weights = vengine.weights
    engine = TimedEngine(vengine)
    shape = ModelShape.from_hf_config(hf_config)
    t0 = time.perf_counter()
    ws = WeightSync(chunks, engine, src_layout=megatron_layout(shape, grid),
                    dst_layout=vllm_layout(shape, tp=2, world_size=world), bucket_bytes=size["bucket"], timeout=600)
    plan_s = time.perf_counter() - t0
    params = {n.removeprefix("module."): p for n, p in chunks[0].named_parameters()}
    order = gather_order(shape, grid)
    res = dict(rank=rank, plan_s=plan_s, ours=[], base=[])

    def timed(fn):
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t

    def baseline():
        clock = dict(gather=0.0, bytes=0)
        it = gather_to_hf(params, order, tp_group=ps.get_tensor_model_parallel_group(), tp=4, clock=clock)
        vengine.update_weights(it)  # vLLM layerwise checkpoint-format reload + prefix-cache reset
        res["base_clock"] = clock

    for i in range(size["repeats"] + 1):  # the first round warms both paths up
        engine.seconds = 0.0
        t_ours = timed(lambda: ws.sync(verify=(i == 0)))
        ours = dict(total=t_ours, engine=engine.seconds, stats=vars(ws.last_stats) | dict(src_sums={}, dst_sums={}))
        if args.quick and i == 0:
            after_ours = weights.read_shards()
        t_base = timed(baseline)
        base = dict(total=t_base, gather=res["base_clock"]["gather"], bytes=res["base_clock"]["bytes"])
        if args.quick and i == 0:
            after_base = weights.read_shards()
            res["readback_equal"] = all(torch.equal(after_ours[n], after_base[n]) for n in after_base)
        if i:
            res["ours"].append(ours)
            res["base"].append(base)
    res.update(bytes_moved=ws.plan.bytes_moved, lower_bound=ws.plan.lower_bound, buckets=len(ws.plan.buckets),
               model_bytes=sum(p.numel() * 4 for p in params.values()) * 4)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()


def report(out_dir: str, quick: bool) -> dict:
    import statistics

    res = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(4)]
    size = SIZES["quick" if quick else "full"]
    med = statistics.median
    ours = med(r["total"] for r in res[0]["ours"])
    base = med(r["total"] for r in res[0]["base"])
    sent = sum(res[r]["ours"][-1]["stats"]["bytes_sent"] for r in range(4))
    base_bytes = sum(res[r]["base"][-1]["bytes"] for r in range(4))
    peak = max(r["ours"][-1]["stats"]["peak_extra_bytes"] for r in res)
    print(f"model: {res[0]['model_bytes'] / 2**20:.0f} MiB fp32, megatron TP4 -> vLLM TP2 x 2, "
          f"bucket {size['bucket'] >> 20} MiB, {res[0]['buckets']} buckets, plan built in {res[0]['plan_s']:.2f}s")
    print(f"baseline gather+reload: {base:.2f}s (all-gather {med(r['gather'] for r in res[0]['base']):.2f}s), "
          f"{base_bytes / 2**20:.1f} MiB moved")
    print(f"ours direct plan:       {ours:.2f}s (engine packing {med(r['engine'] for r in res[0]['ours']):.2f}s), "
          f"{sent / 2**20:.1f} MiB moved (lower bound {res[0]['lower_bound'] / 2**20:.1f} MiB)")
    if quick:
        print(f"vLLM weights after ours == after baseline (bitwise read-back): {all(r['readback_equal'] for r in res)}")
    out = dict(bench="weight_sync", bytes_moved=sent, lower_bound=res[0]["lower_bound"],
               bytes_ratio_to_lower_bound=round(sent / max(res[0]["lower_bound"], 1), 4),
               baseline_bytes_moved=base_bytes, speedup_vs_gather=round(base / ours, 2), ratio=round(base / ours, 2), peak_extra_bytes=peak,
               bucket_bytes=size["bucket"], peak_extra_over_bucket=round(peak / size["bucket"], 3))
    assert list(out) == KEYS
    return out


def run_workers(script: str, worker_args: list, *, nproc: int, out: str) -> int:
    """Run ``script --worker ...`` under torchrun (``nproc`` ranks, vLLM in-process, caches in the
    repo); the log goes to ``out/log.txt``. Returns the exit code (errors summarised on stderr)."""
    import socket

    env = dict(os.environ, PYTHONPATH=REPO, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
               TORCHINDUCTOR_CACHE_DIR=os.path.join(REPO, "runs", ".cache", "inductor"),
               VLLM_CACHE_ROOT=os.path.join(REPO, "runs", ".cache", "vllm"), HF_HUB_OFFLINE="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(port), script, "--worker"] + worker_args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    with open(os.path.join(out, "log.txt"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln or "error" in ln]
        sys.stderr.write("\n".join(lines[:20]) + f"\nbenchmark workers failed; full log: {out}/log.txt\n")
    return proc.returncode


def bench_main(script: str, *, doc: str, worker, make_model_dir, report, sizes: dict, model_name: str,
               ok=lambda result: True) -> int:
    """The command line every sync benchmark shares: ``--quick``; the hidden ``--worker`` re-entry
    under torchrun; a model built once per size under runs/sync/bench/<model_name>-<size>; 4 ranks;
    then rank results -> ``report`` -> one JSON line. Exit 1 when ``ok(result)`` is false."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    run_dir = os.path.join(REPO, "runs", "sync", "bench")
    os.makedirs(run_dir, exist_ok=True)
    size = "quick" if args.quick else "full"
    model_dir = make_model_dir(os.path.join(run_dir, f"{model_name}-{size}"), sizes[size])
    out = tempfile.mkdtemp(prefix=f"{model_name}-", dir=run_dir)
    rc = run_workers(script, ["--model-dir", model_dir, "--out", out] + (["--quick"] if args.quick else []),
                     nproc=4, out=out)
    if rc:
        return rc
    result = report(out, args.quick)
    print(json.dumps(result))
    return 0 if ok(result) else 1


if __name__ == "__main__":
    sys.exit(bench_main(os.path.abspath(__file__), doc=__doc__, worker=worker, make_model_dir=make_model_dir,
                        report=report, sizes=SIZES, model_name="model"))
