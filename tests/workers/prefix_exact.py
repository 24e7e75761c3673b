"""Worker: shared-prefix vs naive training step, per layout, on real megatron-core models.

For every (model, layout) case this rank builds two models from the same HF weights: the
reference with megatron_rl's default core attention (megatron's DotProductAttention, or the
all-gather CP attention at CP>1), run on naive packing (one ``[P, R_i]`` row per response),
and the shared-prefix model (SharedPrefixCoreAttention + PositionRotary) run on
shared-prefix micro-batches. Both take one forward+backward through megatron's pipeline
schedule with the same loss: sum over response tokens of ``-w * log p``. Each rank reports
per-response log-probs (last stage) and, for every local parameter, the relative gradient
error ``||g_shared - g_naive|| / ||g_naive||`` after summing grads over the CP group.

    torchrun --nproc-per-node 2 tests/workers/prefix_exact.py llama,qwen2 tp1,tp2,pp2,cp2
"""
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import tiny_model_paths, write_result  # noqa: E402
from prefix_cases import MAX_TOKENS, make_groups  # noqa: E402

from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix, make_batches, pack_naive  # noqa: E402
from megatron_rl.attention.step import collect_logprobs, make_forward_fn, pg_loss  # noqa: E402
from megatron_rl.config import ParallelConfig  # noqa: E402
from megatron_rl.models import build_gpt  # noqa: E402
from megatron_rl.checkpoint.megatron import load_hf_into  # noqa: E402
from megatron_rl.parallel import destroy_distributed, init_distributed  # noqa: E402

LAYOUTS = {"tp1": dict(), "tp2": dict(tp=2), "pp2": dict(pp=2), "cp2": dict(cp=2), "tp2cp2": dict(tp=2, cp=2),
           "tp2sp": dict(tp=2, sequence_parallel=True), "tp2do": dict(tp=2, distributed_optimizer=True)}
ENGINE_VS_TP1 = ("tp2sp", "tp2do")  # layouts whose GRPO engine step is compared with tp1's (same launch)
_TP1_ENGINE = {}  # model -> tp1 engine result (tp1 runs first)


def _schedule(chunks, batches, step_fn, *, seq_length, micro_batch_size, forward_only=False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=lambda it, m: step_fn(m, next(it)), data_iterator=iter(batches), model=chunks,
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)


def _build(hf_config, path, par, core_attention=None):
    chunks = build_gpt(hf_config, parallel=par, dtype=torch.float32, core_attention=core_attention)
    load_hf_into(chunks, path, hf_config=hf_config)
    chunks[0].config.calculate_per_token_loss = True  # the loss is a plain sum
    return chunks


def _naive_step(chunks, groups, par):
    """Naive packing through the reference model: returns {(g, i): log-probs} on the last stage."""
    from megatron.core import parallel_state as ps

    from megatron_rl.parallel.cp_attention import cp_positions, split_for_cp
    from megatron_rl.train.lm import vocab_parallel_logprobs

    tokens, position_ids, lengths, keys = pack_naive(groups)
    width = -(-tokens.size(1) // (2 * par.cp * par.tp)) * (2 * par.cp * par.tp)
    tokens = torch.nn.functional.pad(tokens, (0, width - tokens.size(1)))  # (B, S)
    position_ids = torch.arange(width).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)
    weights = torch.zeros(tokens.shape)  # weight of the token each position predicts
    for b, (g, i) in enumerate(keys):
        plen, w = len(groups[g].prompt), groups[g].advantages[i]
        weights[b, plen - 1:plen - 1 + len(w)] = torch.tensor(w)
    cp, r = par.cp, ps.get_context_parallel_rank()
    split = lambda t: split_for_cp(t, seq_dim=1, cp_size=cp, cp_rank=r)  # noqa: E731
    batch = {"tokens": split(tokens), "pos": split(position_ids), "labels": split(labels), "w": split(weights)}
    store = {}

    def step_fn(model, b):
        out = model(b["tokens"], b["pos"], attention_mask=None)

        def loss_fn(logits):
            logp = vocab_parallel_logprobs(logits, b["labels"], vocab_size=model.unpadded_vocab_size,
                                           tp_rank=ps.get_tensor_model_parallel_rank())
            store["logp"] = logp.detach()
            loss = -(b["w"] * logp).sum()
            return loss, torch.tensor(1, dtype=torch.int), {"loss_sum": loss.detach()}

        return out, loss_fn

    _schedule(chunks, [batch], step_fn, seq_length=width, micro_batch_size=tokens.size(0))
    if "logp" not in store:
        return {}
    logp = store["logp"]  # (B, S/CP) in CP order
    if cp > 1:
        parts = [torch.empty_like(logp) for _ in range(cp)]
        torch.distributed.all_gather(parts, logp, group=ps.get_context_parallel_group())
        full = torch.empty(logp.size(0), width)
        for rr, part in enumerate(parts):
            full[:, cp_positions(logp.size(1), cp_size=cp, cp_rank=rr)] = part
        logp = full
    out = {}
    for b, (g, i) in enumerate(keys):
        plen = len(groups[g].prompt)
        out[(g, i)] = logp[b, plen - 1:lengths[b] - 1]
    return out


def _shared_step(chunks, groups, par, *, wrong_positions=False):
    """One shared-prefix step. ``wrong_positions``: forward only, with responses NOT restarting
    at len(P) (the negative control: the comparison must catch it)."""
    from megatron.core import parallel_state as ps

    enable_shared_prefix(chunks)
    batches = make_batches(groups, max_tokens=MAX_TOKENS, cp_size=par.cp, pad_multiple=par.tp, kernel="tasks")
    if wrong_positions:
        for b in batches:
            b["locals"] = [replace(lb, position_ids=torch.arange(lb.num_tokens)) for lb in b["locals"]]
    metrics = _schedule(chunks, batches, make_forward_fn(pg_loss), seq_length=batches[0]["tokens"].size(1),
                        micro_batch_size=1, forward_only=wrong_positions)
    if not ps.is_pipeline_last_stage():
        return {}, len(batches)
    cp_group = ps.get_context_parallel_group() if par.cp > 1 else None
    return collect_logprobs(metrics, cp_group=cp_group), len(batches)


def _max_diff(a: dict, b: dict) -> float:
    return max((float((a[k] - b[k]).abs().max()) for k in b if b[k].numel()), default=0.0)


def _grads(chunks, par) -> dict:
    """Every local parameter's gradient, summed over CP, and over TP for sequence-parallel norms
    (their grads are partial per TP rank, as megatron's finalize_model_grads would sum them)."""
    from megatron.core import parallel_state as ps

    out = {}
    for name, p in chunks[0].named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if par.cp > 1:
            torch.distributed.all_reduce(g, group=ps.get_context_parallel_group())
        if par.sequence_parallel and getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        out[name] = g
    return out


def _recompute_check(chunks, groups, par, g_ref) -> float:
    """Full activation recompute re-runs the core attention in backward: grads must not move."""
    cfg = chunks[0].config
    cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers = "full", "uniform", 1
    for p in chunks[0].parameters():
        p.grad = None
    _shared_step(chunks, groups, par)
    g = _grads(chunks, par)
    cfg.recompute_granularity = cfg.recompute_method = cfg.recompute_num_layers = None
    return max(float((g[n] - g_ref[n]).norm() / g_ref[n].norm()) for n in g_ref)


def _grpo_loss(old: dict):
    """GRPO's clipped surrogate, summed: ``old_logp`` = the naive log-probs minus 0.3*cos(target),
    so ratios span [0.74, 1.35] and both clip branches occur (a layout-independent fixed input)."""
    from megatron_rl.algorithms.losses import clipped_policy_loss

    def loss(logp, local):
        old_lp = torch.cat([old[tuple(k)] for k in local.response_keys] + [torch.zeros(0)]).to(logp)
        old_lp = old_lp - 0.3 * torch.cos(local.targets.to(logp.device).float())
        per_token, _ = clipped_policy_loss(logp, old_logp=old_lp, advantages=local.advantages.to(logp.device),
                                           clip_low=0.2, clip_high=0.28)
        loss_sum, n = per_token.sum(), torch.tensor(logp.numel(), dtype=torch.int)
        return loss_sum, n, {"loss_sum": loss_sum.detach().clone(), "tokens": n.clone()}

    return loss


def _weights(chunks) -> dict:
    """name -> sorted values of the full (TP-gathered) parameter: layout-independent, since TP
    shards only permute rows (e.g. the gate/up halves of a gated fc1)."""
    from megatron.core import parallel_state as ps

    from megatron_rl.attention.core import unwrap

    tp, out = ps.get_tensor_model_parallel_world_size(), {}
    for name, p in unwrap(chunks[0]).named_parameters():
        x = p.detach().float().flatten().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(x) for _ in range(tp)]
            torch.distributed.all_gather(parts, x, group=ps.get_tensor_model_parallel_group())
            x = torch.cat(parts)
        out[name] = x.sort().values
    return out


def _weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[n] - b[n]).abs().max()) if a[n].shape == b[n].shape else float("inf") for n in a)


def _engine_check(hf_config, path, par, groups, naive, model, layout, topo) -> dict:
    """One TrainEngine GRPO step (DDP, megatron Adam; distributed at tp2do) on shared-prefix
    batches. lr 1e-4: Adam maps near-zero grads to updates of ~lr, so grad noise of 1e-7 moves
    such weights by up to ~2% of lr (1.8e-5 at lr 1e-3). At tp1: its loss (token mean) must equal the same mean over the naive log-probs, and
    the step must move the weights. Elsewhere: loss, grad norm and updated weights vs tp1's."""
    from megatron_rl.config import TrainConfig
    from megatron_rl.train.engine import TrainEngine

    eng = TrainEngine(hf_config, parallel=par, train=TrainConfig(lr=1e-4, grad_clip=0.0), topo=topo, hf_path=path,
                      core_attention=SharedPrefixCoreAttention, forward_fn=make_forward_fn(_grpo_loss(naive)))
    enable_shared_prefix(eng.model)
    before = _weights(eng.model)
    out = eng.step(make_batches(groups, max_tokens=MAX_TOKENS, cp_size=par.cp, pad_multiple=par.tp))
    after = _weights(eng.model)
    res = {"loss": out["loss"], "grad_norm": out["grad_norm"], "tokens": out["tokens"]}
    if layout == "tp1":
        num = 0.0
        for (g, i), lp in naive.items():
            ratio = torch.exp(0.3 * torch.cos(torch.tensor(groups[g].responses[i]).float()))
            adv = torch.tensor(groups[g].advantages[i])
            num += float(torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)).sum())
        den = sum(lp.numel() for lp in naive.values())
        dp = torch.distributed.get_world_size() // (par.tp * par.pp * par.cp)  # DP ranks repeat the batch
        _TP1_ENGINE[model] = dict(res, weights=after)
        return dict(res, naive_loss=num / den, naive_tokens=den * dp, weight_change=_weight_diff(after, before))
    if model not in _TP1_ENGINE:
        raise ValueError(f"layout {layout} compares with tp1: list tp1 first in the same launch")
    ref = _TP1_ENGINE[model]
    return dict(res, loss_diff=abs(res["loss"] - ref["loss"]),
                grad_norm_rel=abs(res["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
                max_weight_diff=_weight_diff(after, ref["weights"]))


def run_case(model: str, layout: str, path: str) -> dict:
    from transformers import AutoConfig

    par = ParallelConfig(**LAYOUTS[layout])
    hf_config = AutoConfig.from_pretrained(path)
    topo = init_distributed(par)
    try:
        groups = make_groups(vocab=hf_config.vocab_size)
        t0 = time.perf_counter()
        ref = _build(hf_config, path, par)
        naive = _naive_step(ref, groups, par)
        shared_model = _build(hf_config, path, par, core_attention=SharedPrefixCoreAttention)
        shared, n_mb = _shared_step(shared_model, groups, par)
        g_ref, g_sp = _grads(ref, par), _grads(shared_model, par)
        rel = {n: float((g_sp[n] - g_ref[n]).norm() / g_ref[n].norm().clamp(min=1e-30)) for n in g_ref}
        extra = {}
        if layout == "tp1":
            wrong, _ = _shared_step(shared_model, groups, par, wrong_positions=True)
            extra["control_logp_diff"] = _max_diff(wrong, naive)
            extra["recompute_max_grad_rel"] = _recompute_check(shared_model, groups, par, g_ref)
            extra["engine"] = _engine_check(hf_config, path, par, groups, naive, model, layout, topo)
        if layout in ENGINE_VS_TP1:
            extra["engine_vs_tp1"] = _engine_check(hf_config, path, par, groups, naive, model, layout, topo)
        return {"model": model, "layout": layout, "micro_batches": n_mb, "seconds": time.perf_counter() - t0,
                "max_logp_diff": _max_diff(shared, naive) if naive else None, **extra,
                "keys_naive": sorted(map(list, naive)),
                "keys_shared": sorted(map(list, shared)),
                "logp_shared": {f"{g},{i}": v.tolist() for (g, i), v in shared.items()},
                "grad_rel": rel, "max_grad_rel": max(rel.values()), "n_params": len(rel),
                "grad_norms": {n: float(g.norm()) for n, g in g_ref.items()}}
    finally:
        destroy_distributed(keep_process_group=True)


def main():
    models, layouts = sys.argv[1].split(","), sys.argv[2].split(",")
    paths = tiny_model_paths()
    results = [run_case(m, lay, paths[m]) for lay in layouts for m in models]
    write_result({"cases": results})
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
