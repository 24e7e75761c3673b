"""Worker: MoE routing capture in vLLM and routing replay in megatron-core, 4 processes, one launch.

1. Rollout: a real vLLM engine (fp32, TP1 x 4 replicas) samples G responses of N prompts with
   ``Sampling(routes=True)``, twice. The prompts are longer than one CPU KV block (128 tokens), so
   later copies of a prompt (in the first call too) and the second call find them in vLLM's prefix
   cache: those tokens are not recomputed and their routes come from the store (``served``).
2. Independent reference: HF transformers' ``Qwen3MoeForCausalLM`` on every ``prompt + response``
   with ``output_router_logits=True``: its top-k expert set per (token, layer). Rank 0 reports the
   decisions where vLLM's captured routes differ from it (the final token, never routed, aside),
   and, as a negative control, the same comparison against HF's *other* layer.
3. Training at TP2 x EP2 with sequence parallelism, at PP2 x EP2 (each stage replays its own
   layers) and at CP2 x EP2 (each CP rank replays the rows of its chunks), with ``TrainEngine(routes="replay")`` on the shared-prefix packed groups: log-probs and the route-mismatch counts with replay off (the
   routers' own top-k, counted against vLLM's routes), replaying vLLM's routes, replaying HF's
   routes, and replaying HF's routes with layer 1's response routes shifted to other experts
   (the negative control). Then one optimizer step (lr 0) without and with replay of HF's routes:
   loss and grad norm.

    torchrun --nproc-per-node 4 tests/workers/route_replay.py MODEL_PATH
"""
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import write_result  # noqa: E402

from megatron_rl.config import load_config  # noqa: E402

N, G, MAX_NEW = 4, 3, 10


def rollout(path: str) -> tuple:
    """(prompts, [first call, second call] generations, positions served from the prefix store)."""
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.rollout.base import Sampling
    from megatron_rl.rollout.vllm_engine import VllmEngine

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 240, (int(torch.randint(130, 170, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N)]
    cfg = load_config(overrides=[f"model.hf_path={path}", "parallel.backend=gloo", "rollout.tp=1",
                                 f"rollout.kv_cache_bytes={16 << 20}", "rollout.max_model_len=256",
                                 f"logging.run_dir={os.path.join(os.environ['OUT_DIR'], 'rollout')}"])
    topo = init_distributed(cfg.parallel, rollout_tp=1)
    engine = VllmEngine(path, cfg=cfg.rollout, topo=topo, run_dir=cfg.logging.run_dir, dtype="float32")
    flat = [p for p in prompts for _ in range(G)]
    calls = [engine.generate(flat, sampling=Sampling(max_new_tokens=MAX_NEW, temperature=1.0, seed=s, routes=True))
             for s in (1, 2)]
    served = engine.recorder.store.served
    destroy_distributed(keep_process_group=True)
    return prompts, calls, served


def hf_routes(path: str, sequences: list) -> list:
    """HF transformers' top-k expert ids per token and layer, (S, L, k) per sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    out = []
    with torch.no_grad():
        for seq in sequences:
            res = model(torch.tensor([seq]), output_router_logits=True)
            out.append(torch.stack([lg.reshape(len(seq), -1).topk(k, dim=-1).indices for lg in res.router_logits], 1))
    return out


def set_differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., k) expert ids: True where the two sets differ."""
    return (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)


def capture_figures(calls: list, hf: list) -> dict:
    per_call = []
    for c, gens in enumerate(calls):
        ref = hf[c * len(gens):(c + 1) * len(gens)]
        diff = [set_differs(x.routes[:-1].long(), r[:-1]) for x, r in zip(gens, ref)]
        swapped = [set_differs(x.routes[:-1].long(), r[:-1].flip(1)) for x, r in zip(gens, ref)]
        per_call.append({"decisions": sum(d.numel() for d in diff), "differ": sum(int(d.sum()) for d in diff),
                         "differ_other_layer": sum(int(d.sum()) for d in swapped),
                         "shapes_ok": all(tuple(x.routes.shape) == (len(x.prompt) + len(x.tokens), 2, 2) for x in gens),
                         "last_fill": all(x.routes[-1].tolist() == [[0, 1], [0, 1]] for x in gens)})
    return {"calls": per_call}


def groups_of(prompts: list, gens: list, routes: list) -> list:
    from megatron_rl.attention import Group

    out = []
    for g, p in enumerate(prompts):
        rs = routes[g * G:(g + 1) * G]
        out.append(Group(prompt=p, responses=[gens[g * G + i].tokens for i in range(G)], advantages=[1.0] * G,
                         prompt_routes=rs[0][:len(p)], response_routes=[r[len(p):] for r in rs]))
    return out


def forward(eng, groups: list, *, replay: bool) -> dict:
    """{(group, response): log-probs} on every rank, and the global (mismatched, decisions)."""
    from megatron_rl.attention import collect_logprobs, make_batches, make_forward_fn, pg_loss
    from megatron_rl.parallel import collectives as coll

    eng.routing.replay, eng.routing.counting = replay, True
    metrics = eng.forward(make_batches(groups, max_tokens=4096, pad_multiple=2, cp_size=eng.topo.grid.cp), forward_fn=make_forward_fn(pg_loss))
    eng.routing.counting = False
    counts, _ = coll.sum_max(list(eng.routing.take_counts()), [])
    mine = collect_logprobs(metrics) if eng.topo.is_last_stage else {}
    table = {}
    for part in coll.all_gather_object(mine):
        table.update(part)
    return {"logp": {f"{g},{i}": v.tolist() for (g, i), v in table.items()}, "mismatched": counts[0],
            "decisions": counts[1]}


def shifted(routes: list, prompts: list) -> list:
    """HF's routes with layer 1's response routes moved to experts (e + 1) mod 8 (never the same set)."""
    out = []
    for j, r in enumerate(routes):
        r = r.clone()
        plen = len(prompts[j // G])
        r[plen:, 1] = (r[plen:, 1] + 1) % 8
        out.append(r)
    return out


LAYOUTS = {"tp2_ep2_sp": ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"],
           "pp2_ep2": ["parallel.pp=2", "parallel.ep=2"],
           "cp2_ep2": ["parallel.cp=2", "parallel.ep=2"]}  # CP chunks: each rank replays its own rows


def train(path: str, prompts: list, gens: list, hf: list, *, layout: str) -> dict:
    from transformers import AutoConfig

    from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix, make_batches
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.train.engine import TrainEngine

    cfg = load_config(overrides=[f"model.hf_path={path}", "parallel.backend=gloo", *LAYOUTS[layout],
                                 "algorithm.routing_replay=true"])
    topo = init_distributed(cfg.parallel)
    eng = TrainEngine(AutoConfig.from_pretrained(path), parallel=cfg.parallel, train=cfg.train, topo=topo,
                      hf_path=path, core_attention=SharedPrefixCoreAttention, routes="replay")
    enable_shared_prefix(eng.model)
    vllm_groups = groups_of(prompts, gens, [x.routes for x in gens])
    hf_groups = groups_of(prompts, gens, hf)
    out = {"off": forward(eng, vllm_groups, replay=False), "replay_vllm": forward(eng, vllm_groups, replay=True),
           "replay_hf": forward(eng, hf_groups, replay=True),
           "replay_shifted": forward(eng, groups_of(prompts, gens, shifted(hf, prompts)), replay=True)}
    from megatron_rl.attention import make_forward_fn, pg_loss

    for group in eng.optimizer.param_groups:  # lr 0: both steps see the same weights
        group["lr"] = 0.0
    steps = {}
    for name, replay in (("off", False), ("replay_hf", True)):
        eng.routing.replay = replay
        steps[name] = eng.step(make_batches(hf_groups, max_tokens=4096, pad_multiple=2, cp_size=eng.topo.grid.cp),
                               forward_fn=make_forward_fn(pg_loss))
    out["steps"] = {k: {"loss": v["loss"], "grad_norm": v["grad_norm"]} for k, v in steps.items()}
    destroy_distributed(keep_process_group=True)
    return out


def main():
    path = sys.argv[1]
    t0 = time.perf_counter()
    dist.init_process_group("gloo")
    prompts, calls, served = rollout(path)
    t1 = time.perf_counter()
    flat = [x for gens in calls for x in gens]
    hf = hf_routes(path, [x.prompt + x.tokens for x in flat])
    t2 = time.perf_counter()
    res = {"capture": capture_figures(calls, hf), "served": served,
           "rollout_logp": {f"{j // G},{j % G}": x.logprobs for j, x in enumerate(calls[0])},
           "prompt_lens": [len(p) for p in prompts], "response_lens": [len(x.tokens) for x in calls[0]]}
    res["train"] = {name: train(path, prompts, calls[0], hf[:len(calls[0])], layout=name) for name in LAYOUTS}
    res["seconds"] = {"rollout": t1 - t0, "hf": t2 - t1, "train": time.perf_counter() - t2}
    write_result(res)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
