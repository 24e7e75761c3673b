"""Weight sync without vLLM: a wide exactness sweep into a recording receiver, then a rank dies.

Part 1 (:func:`sweep`): for each Megatron (t_m, p_m) in --cases and each t_v in --tvs, sync
into a receiver that keeps the shards, and compare them bitwise with our vLLM layout assembled
from the HF tensors (the layout itself is checked against vLLM's loaders in sync_exact.py).
Part 2 (:func:`fault`): rank --victim exits in the middle of a sync (after its second
delivered shard), at once or after stalling --stall seconds; the other ranks must raise
WeightSyncError naming a peer within the timeout, never hang. The fault ends the process.

tests/workers/sync_exact.py runs both after its vLLM cases (one launch); standalone::

    torchrun --nproc-per-node 4 tests/workers/sync_fault.py --cases 2x2,4x1 --tvs 1,2,4 --victim 3
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_common as C  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _bounds import sync_lower_bound  # noqa: E402
from _launch import write_result  # noqa: E402

from megatron_rl.models.shape import ModelShape  # noqa: E402
from megatron_rl.resharding.layout import assemble, megatron_layout  # noqa: E402
from megatron_rl.resharding.sync import WeightSync  # noqa: E402
from megatron_rl.resharding.transport import WeightSyncError  # noqa: E402
from megatron_rl.resharding.vllm_layout import vllm_layout  # noqa: E402


class Recorder:
    """A receiver that keeps what it is given; ``die_after`` deliveries make the process exit."""

    def __init__(self, shapes, *, die_after=None, on_die=None, stall=0.0):
        self.shapes, self.die_after, self.on_die, self.stall = shapes, die_after, on_die, stall
        self.got, self.calls = {}, []

    def shard_shapes(self):
        return self.shapes

    def begin_weight_update(self):
        self.calls.append("begin")

    def load_shards(self, shards, *, donate=False):
        for name, t in shards:
            self.got[name] = t.clone()
            if self.die_after is not None and len(self.got) >= self.die_after:
                self.on_die()
                time.sleep(self.stall)  # stall: alive but silent, so the peers' waits must time out
                os._exit(0)  # a silent death: no error message, the peers just stop hearing from us

    def end_weight_update(self):
        self.calls.append("end")


def sweep(path, hf_config, hf, *, cases, tvs) -> tuple:
    """Part 1; returns (per-sync records, the last case's (chunks, grid)) on this rank."""
    shape = ModelShape.from_hf_config(hf_config)
    records, built = [], None
    for case in cases:
        tm, pm = (int(x) for x in case.split("x"))
        built = chunks, grid = C.build_megatron(path, tp=tm, pp=pm, hf_config=hf_config)
        world, rank = dist.get_world_size(), dist.get_rank()
        for tv in tvs:
            dst = vllm_layout(shape, tp=tv, world_size=world)
            want = {n: assemble(lt, lambda c, d, s, k: hf[c].narrow(d, s, k), dtype=torch.float32)
                    for n, lt in dst.ranks[rank].items()}
            rec = Recorder({n: lt.shape for n, lt in dst.ranks[rank].items()})
            src = megatron_layout(shape, grid)
            ws = WeightSync(chunks, rec, src_layout=src, dst_layout=dst, bucket_bytes=16 << 10, verify=True)
            st = ws.sync()
            records.append(dict(case=case, tv=tv, mismatched=C.diff_shards(rec.got, want), sent=st.bytes_sent,
                                bytes_moved=ws.plan.bytes_moved, lower_bound=ws.plan.lower_bound,
                                bound=sync_lower_bound(src, dst, elem_size=ws.plan.elem_size),
                                calls=rec.calls, peak_extra=st.peak_extra_bytes, buckets=len(ws.plan.buckets)))
    return records, built


def fault(chunks, grid, hf_config, out: dict, *, victim: int, timeout: float, stall: float) -> None:
    """Part 2: sync into t_v=4 while ``victim`` dies; write this rank's result and exit the process."""
    shape = ModelShape.from_hf_config(hf_config)
    world, rank = dist.get_world_size(), dist.get_rank()
    dst = vllm_layout(shape, tp=4, world_size=world)
    shapes = {n: lt.shape for n, lt in dst.ranks[rank].items()}

    def on_die():
        write_result(dict(out, victim=True))

    rec = Recorder(shapes, die_after=2 if rank == victim else None, on_die=on_die, stall=stall)
    ws = WeightSync(chunks, rec, src_layout=megatron_layout(shape, grid), dst_layout=dst, bucket_bytes=4 << 10,
                    timeout=timeout)
    dist.barrier()
    t0 = time.perf_counter()
    try:
        ws.sync()
        out["fault"] = dict(error=None, seconds=time.perf_counter() - t0)
    except WeightSyncError as e:
        out["fault"] = dict(error=str(e), seconds=time.perf_counter() - t0)
    write_result(out)
    os._exit(0)  # a peer is dead: skip process-group teardown


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="q3")
    ap.add_argument("--cases", required=True)
    ap.add_argument("--tvs", required=True)
    ap.add_argument("--victim", type=int, default=-1)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--stall", type=float, default=0.0, help="victim stalls this long before exiting")
    args = ap.parse_args()
    from transformers import AutoConfig

    path = C.sync_model(args.model, os.environ["MODEL_ROOT"])
    hf_config = AutoConfig.from_pretrained(path)
    records, (chunks, grid) = sweep(path, hf_config, C.hf_tensors(path), cases=args.cases.split(","),
                                    tvs=[int(x) for x in args.tvs.split(",")])
    out = dict(sweep=records)
    if args.victim >= 0:
        fault(chunks, grid, hf_config, out, victim=args.victim, timeout=args.timeout, stall=args.stall)
    write_result(out)
    dist.barrier()


if __name__ == "__main__":
    main()
