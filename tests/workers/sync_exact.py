"""Multi-rank exactness of the weight sync: real megatron-core -> real vLLM (external_launcher).

One production rollout engine (VllmEngine: TP = --tv, replicas fill the world) per run of
consecutive cases with the same vLLM TP (a case's "@TV" picks another: the engine before it is
closed, vLLM's TP groups destroyed, and a new engine starts); Megatron layouts are rebuilt per case. The reference is what vLLM itself holds after loading
the HF checkpoint: read back (bitwise, kernel format) right after start-up, or, with --dummy,
after vLLM's own checkpoint-format reload following the first sync. Before every case the engine's weights
are overwritten with noise, so a sync that skips anything fails. A case ``TMxPM:p2p`` syncs through
TorchP2P without gloo coalescing (one message per slice: the NCCL path), bitwise like the rest. With --sweep-cases the same launch
then runs sync_fault.py's sweep into a recording receiver (no vLLM involved) and, with --victim,
its dead-rank fault last (it ends the processes). For an MoE model, each engine's last step
corrupts one element of one expert shard and reads back: the bitwise checks must name exactly it.

    torchrun --nproc-per-node 4 tests/workers/sync_exact.py --model q2 --tv 2 --cases 1x1,2x2 [--dummy]
    torchrun --nproc-per-node 4 tests/workers/sync_exact.py --model qm --tv 2 --cases 1x1e2,2x1e2@1,1x2e2@4
    torchrun --nproc-per-node 4 tests/workers/sync_exact.py --model q3 --tv 2 --cases 1x1 \
        --sweep-cases 2x2,4x1 --sweep-tvs 1,2,4 --victim 3 --timeout 4 --stall 12
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_common as C  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _bounds import element_masks, plan_cross_rank_bytes, sync_lower_bound  # noqa: E402
from _launch import write_result  # noqa: E402

from megatron_rl.models.shape import ModelShape  # noqa: E402
from megatron_rl.resharding.layout import assemble, megatron_layout  # noqa: E402
from megatron_rl.resharding.sync import WeightSync  # noqa: E402
from megatron_rl.resharding.transport import TorchP2P  # noqa: E402
from megatron_rl.resharding.vllm_layout import vllm_layout  # noqa: E402


def layout_vs_vllm(shape, hf, ref, *, tv, world, rank):
    """Our vLLM layout assembled from HF tensors vs what vLLM's own loaders produced."""
    mine = vllm_layout(shape, tp=tv, world_size=world).ranks[rank]
    want = {n: assemble(lt, lambda c, d, s, k: hf[c].narrow(d, s, k), dtype=torch.float32) for n, lt in mine.items()}
    return C.diff_shards(ref, want)


def parse_case(case: str, *, tv: int) -> tuple:
    """"TMxPM[eEP][@TV]" (the default transport: coalesced per peer over gloo) or "...:p2p" (TorchP2P with
    coalesce=False: one message per slice, the path NCCL takes) -> (tm, pm, ep, coalesce or None, tv).
    "1x2e2" is Megatron TP1 x PP2 x EP2 (an MoE model); "@4" syncs into a vLLM TP4 engine (default: ``tv``)."""
    layout, _, transport = case.partition(":")
    if transport not in ("", "p2p"):
        raise ValueError(f"case {case!r}: transport suffix must be ':p2p' or nothing")
    layout, _, case_tv = layout.partition("@")
    layout, _, ep = layout.partition("e")
    tm, pm = (int(x) for x in layout.split("x"))
    return tm, pm, int(ep or 1), (False if transport == "p2p" else None), int(case_tv or tv)


def run_case(path, hf_config, shape, recv, *, case, tv, bucket, seed):
    world, rank = dist.get_world_size(), dist.get_rank()
    tm, pm, ep, coalesce, _ = parse_case(case, tv=tv)
    chunks, grid = C.build_megatron(path, tp=tm, pp=pm, ep=ep, hf_config=hf_config)
    recv.scramble(seed)
    src, dst = megatron_layout(shape, grid), vllm_layout(shape, tp=tv, world_size=world)
    ws = WeightSync(chunks, recv, src_layout=src, dst_layout=dst, bucket_bytes=bucket, timeout=60, verify=True,
                    transport=TorchP2P(timeout=60, coalesce=coalesce))
    t0 = time.perf_counter()
    stats = ws.sync()
    seconds = time.perf_counter() - t0
    return dict(case=case, coalesced=ws.transport.coalesce, bytes_moved=ws.plan.bytes_moved,
                lower_bound=ws.plan.lower_bound, bound=sync_lower_bound(src, dst, elem_size=ws.plan.elem_size), carried=plan_cross_rank_bytes(ws.plan),
                sent=stats.bytes_sent, received=stats.bytes_received, local=stats.bytes_local,
                buckets=len(ws.plan.buckets), peak_extra=stats.peak_extra_bytes, seconds=seconds,
                verified=ws.verify(), delivered=sorted(recv.received), rank=rank,
                own_need=int(sum(m.sum() for m in element_masks(dst)[rank].values())) * ws.plan.elem_size,
                expert_in=expert_bytes_into(ws.plan, rank), megatron=C.megatron_coords(), vllm=C.vllm_tp_rank())


def expert_bytes_into(plan, rank: int) -> int:
    """Bytes the plan's ops carry from other ranks into this rank's expert slots (from the ops' shapes)."""
    total = 0
    for op in (op for bucket in plan.buckets for op in bucket):
        if op.dst_rank == rank != op.src_rank and ".routed_experts." in op.dst_name:
            shape = plan.dst_tensors[rank][op.dst_name].shape
            total += op.length * (math.prod(shape) // shape[op.dim]) * plan.elem_size
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tv", type=int, required=True, help="vLLM TP of the cases without '@TV'")
    ap.add_argument("--cases", required=True)
    ap.add_argument("--dummy", action="store_true")
    ap.add_argument("--bucket", type=int, default=64 << 10)
    ap.add_argument("--sweep-cases", default="", help="then sync_fault.sweep over these t_m x p_m ...")
    ap.add_argument("--sweep-tvs", default="1,2,4", help="... into these t_v")
    ap.add_argument("--victim", type=int, default=-1, help="then sync_fault.fault: this rank dies mid-sync")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--stall", type=float, default=0.0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    from transformers import AutoConfig

    path = C.sync_model(args.model, os.environ["MODEL_ROOT"])
    hf_config = AutoConfig.from_pretrained(path)
    cases = args.cases.split(",")
    tm, pm, ep, _, _ = parse_case(cases[0], tv=args.tv)
    C.build_megatron(path, tp=tm, pp=pm, ep=ep, hf_config=hf_config)  # megatron before vLLM
    world, rank = dist.get_world_size(), dist.get_rank()
    out = dict(rank=rank, world=world, model=args.model, dummy=args.dummy, engines=[], t_setup=time.perf_counter() - t_start)
    groups: list = []  # consecutive cases with the same vLLM TP share one engine
    for case in cases:
        tv = parse_case(case, tv=args.tv)[4]
        if groups and groups[-1][0] == tv:
            groups[-1][1].append(case)
        else:
            groups.append((tv, [case]))
    hf, engine = C.hf_tensors(path), None
    for g, (tv, group) in enumerate(groups):
        res, engine = engine_cases(path, hf_config, hf, args=args, tv=tv, cases=group, last=g == len(groups) - 1)
        out["engines"].append(dict(res, t_done=time.perf_counter() - t_start))
    if args.sweep_cases:
        sweep_then_fault(args, path, hf_config, hf, out)
    write_result(out)
    dist.barrier()  # the last engine is still referenced: vLLM's shutdown on its release ends torch.distributed
    del engine


def engine_cases(path, hf_config, hf, *, args, tv: int, cases: list, last: bool) -> tuple:
    """One vLLM engine of TP ``tv``: its reference, every case synced into it, the controls; then
    (unless ``last``) the engine goes, so the next one can take another TP size. Returns
    (results, the engine or None)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = ModelShape.from_hf_config(hf_config)
    t_llm = time.perf_counter()
    engine = C.make_engine(path, tp=tv, dummy=args.dummy, run_dir=os.environ["OUT_DIR"])
    recv, llm = C.Receiver(engine), engine.llm
    out = dict(tv=tv, cases=[], t_llm=time.perf_counter() - t_llm)
    if not args.dummy:
        ref, ref_gen, ref_held = recv.weights.read_shards(), C.greedy(llm), C.held_experts(recv.weights)
    for i, case in enumerate(cases):
        res = run_case(path, hf_config, shape, recv, case=case, tv=tv, bucket=args.bucket, seed=i)
        got, gen, held = recv.weights.read_shards(), C.greedy(llm), C.held_experts(recv.weights)
        if args.dummy and i == 0:  # reference: vLLM's own checkpoint-format load of the HF tensors
            engine.update_weights(hf.items())  # vLLM layerwise reload + prefix-cache reset
            ref, ref_gen, ref_held = recv.weights.read_shards(), C.greedy(llm), C.held_experts(recv.weights)
        res.update(mismatched=C.diff_shards(got, ref), gen_equal=gen == ref_gen, gen=gen[:2],
                   held_mismatched=C.diff_shards(held, ref_held), held_experts=len(ref_held),
                   names=len(ref), scrambled_differs=None)
        out["cases"].append(res)
    out["layout_vs_vllm_loaders"] = layout_vs_vllm(shape, hf, ref, tv=tv, world=world, rank=rank)
    out["ref_gen"] = ref_gen[:2]
    if ref_held:
        out.update(moe_controls(engine, recv, hf, synced=got, ref=ref, ref_held=ref_held))
    # The noise really changes the output (so equal generations above are evidence).
    recv.scramble(99)
    out["noise_gen_differs"] = C.greedy(llm) != ref_gen
    out["noise_held_differs"] = sorted(n for n, t in C.held_experts(recv.weights).items()
                                       if not torch.equal(t, ref_held[n]))
    if last:
        return out, engine
    C.close_engine(engine)
    return out, None


def moe_controls(engine, recv, hf, *, synced, ref, ref_held) -> dict:
    """vLLM's own reload of the HF tensors (engine.update_weights: the baseline path) ends bitwise
    where its start-up load did (every shard and packed stack: generations would follow); then one element of one expert off: the bitwise checks name exactly it."""
    engine.update_weights(hf.items())
    out = dict(reload_mismatched=C.diff_shards(recv.weights.read_shards(), ref),
               reload_held_mismatched=C.diff_shards(C.held_experts(recv.weights), ref_held))
    out["corrupt"] = corrupt_one_expert(recv, synced)
    out["corrupt_found"] = C.diff_shards(recv.weights.read_shards(), ref)
    out["corrupt_held_found"] = C.diff_shards(C.held_experts(recv.weights), ref_held)
    return out


def corrupt_one_expert(recv, synced: dict) -> str:
    """Reload every shard as synced except one element of the last expert's w2 (a later rank's
    expert on every rank), through the receiver; returns that shard's name."""
    name = sorted(n for n in synced if ".routed_experts.w2_weight[" in n)[-1]
    bad = dict(synced)
    bad[name] = synced[name].clone()
    bad[name].view(-1)[-1] += 1.0
    recv.begin_weight_update()
    recv.load_shards(list(bad.items()))
    recv.end_weight_update()
    return name


def sweep_then_fault(args, path, hf_config, hf, out: dict) -> None:
    """After the vLLM cases: sync_fault's sweep (no vLLM), then its fault, which ends the process."""
    import sync_fault

    out["sweep"], (chunks, grid) = sync_fault.sweep(path, hf_config, hf, cases=args.sweep_cases.split(","),
                                                    tvs=[int(x) for x in args.sweep_tvs.split(",")])
    if args.victim >= 0:
        dist.barrier()  # vLLM is done on every rank: its shared memory can go before the hard exit
        if dist.get_rank() == 0:
            out["shm_unlinked"] = len(C.unlink_job_shm())
        sync_fault.fault(chunks, grid, hf_config, out, victim=args.victim, timeout=args.timeout, stall=args.stall)


if __name__ == "__main__":
    main()
