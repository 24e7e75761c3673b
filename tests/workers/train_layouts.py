"""Worker for tests/test_training_layouts.py (run under torchrun).

Builds several training layouts one after the other in the same processes (megatron's
parallel state is torn down and rebuilt between them), and for each layout and model family:
checks that the built parameters' names and shapes equal the layout algebra's, loads the HF
weights, and runs 2 optimizer steps on the same global batch. Writes per-rank JSON.

argv: model-dir JSON ({family: path}), then layouts as tp,pp,cp[,sp][,do][,epN] strings. A layout
with an ``epN`` part (expert parallelism N, ep1 included) runs the MoE families (``*moe*``) only;
one without runs the dense families only.
"""
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from _launch import write_result  # noqa: E402
from megatron_rl.config import ParallelConfig, TrainConfig
from megatron_rl.parallel import destroy_distributed, init_distributed
from megatron_rl.models.shape import ModelShape
from megatron_rl.resharding.layout import megatron_rank_tensors
from megatron_rl.train.engine import TrainEngine
from megatron_rl.train.lm import synthetic_batches

STEPS, MICRO, B, S = 2, 4, 2, 16


def parse(spec: str) -> ParallelConfig:
    parts = spec.split(",")
    tp, pp, cp = map(int, parts[:3])
    ep = next((int(p[2:]) for p in parts[3:] if p.startswith("ep")), 1)
    return ParallelConfig(tp=tp, pp=pp, cp=cp, ep=ep, sequence_parallel="sp" in parts,
                          distributed_optimizer="do" in parts)


def families_of(spec: str, paths: dict) -> dict:
    moe = any(p.startswith("ep") for p in spec.split(",")[3:])
    return {f: p for f, p in paths.items() if ("moe" in f) == moe}


def run_layout(spec: str, paths: dict) -> dict:
    from transformers import AutoConfig

    par = parse(spec)
    topo = init_distributed(par)
    grid = topo.grid
    rank = torch.distributed.get_rank()
    c = grid.coords(rank)
    out = {}
    for family, path in families_of(spec, paths).items():
        hf_config = AutoConfig.from_pretrained(path)
        eng = TrainEngine(hf_config, parallel=par, train=TrainConfig(lr=1e-3, grad_clip=1e9), topo=topo, hf_path=path)
        expected = megatron_rank_tensors(ModelShape.from_hf_config(hf_config), tp=par.tp, pp=par.pp,
                                         tp_rank=c.tp, pp_rank=c.pp, ep=par.ep, ep_rank=c.ep)
        got = {n: list(p.shape) for n, p in eng.model[0].module.named_parameters()}
        names_ok = got == {n: list(lt.shape) for n, lt in expected.items()}
        batches = synthetic_batches(vocab=hf_config.vocab_size, num=MICRO, batch=B, seq=S, seed=7)
        mine = batches[c.dp::grid.dp]  # this DP rank's share of the same global batch
        steps = [eng.step(mine) for _ in range(STEPS)]
        out[family] = {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps],
                       "tokens": [s["tokens"] for s in steps], "names_ok": names_ok,
                       "n_params": len(got)}
        del eng
        gc.collect()
    destroy_distributed(keep_process_group=True)
    return out


def main():
    paths = json.loads(sys.argv[1])
    results = {spec: run_layout(spec, paths) for spec in sys.argv[2:]}
    write_result(results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
