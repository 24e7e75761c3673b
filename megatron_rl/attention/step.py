"""Training-step glue: shared-prefix micro-batches, the forward step, per-response log-probs.

:func:`make_batches` packs groups into micro-batches for the engine (every CP rank's share is
computed identically on every rank; all micro-batches get the same length so pipeline
shapes agree). :func:`make_forward_fn` returns a ``forward_fn(model, batch)`` for
:class:`megatron_rl.train.engine.TrainEngine` (or megatron's schedules) whose loss sees the
per-token log-probs of this rank's response tokens as ``(B_local, T)`` padded tensors:
exactly the inputs the GRPO loss of ``megatron_rl.algorithms.losses`` takes.

Usage::

    batches = make_batches(groups, max_tokens=8192, max_seq_len=4096, cp_size=cp, pad_multiple=tp)
    eng = TrainEngine(hf, parallel=par, train=tr, topo=topo, hf_path=path, core_attention=SharedPrefixCoreAttention,
                      forward_fn=make_forward_fn(pg_loss))
    enable_shared_prefix(eng.model)
    eng.step(batches)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from megatron_rl.attention.core import SharedPrefixParams, unwrap
from megatron_rl.attention.packing import Group, pack_groups
from megatron_rl.attention.plan import LocalBatch, build_local, local_length
from megatron_rl.parallel import collectives as coll
from megatron_rl.parallel.topology import group_rank, group_size, model_groups
from megatron_rl.train.lm import vocab_parallel_logprobs


def split_responses(groups: Sequence[Group]) -> tuple[list, list]:
    """The naive layout as groups: each response becomes a one-response group ``[P, R_i]``.

    Returns ``(singletons, keys)``: ``keys[j] = (group index, response index)`` of singleton j.
    """
    singles, keys = [], []
    for g, group in enumerate(groups):
        for i, resp in enumerate(group.responses):
            adv = None if group.advantages is None else [group.advantages[i]]
            routes = None if group.response_routes is None else [group.response_routes[i]]
            singles.append(Group(prompt=group.prompt, responses=[resp], advantages=adv,
                                 prompt_routes=group.prompt_routes, response_routes=routes))
            keys.append((g, i))
    return singles, keys


def make_batches(groups: Sequence[Group], *, max_tokens: int, max_seq_len: Optional[int] = None, cp_size: int = 1,
                 pad_multiple: int = 1, kernel: str = "auto", shared_prefix: bool = True) -> list:
    """Engine micro-batches: ``{"tokens": (1, CP*T), "locals": [LocalBatch per CP rank], "kernel"}``.

    ``tokens`` holds every CP rank's rows back to back (the engine reads the pipeline shape
    from it); the forward step uses ``locals[cp_rank]``.

    ``shared_prefix=False`` is the naive baseline: every response is its own causal sequence
    ``[P, R_i]`` (the prompt runs G times; :func:`split_responses`), packed back to back without
    padding. Response keys still name ``(group, response)`` of ``groups``, so the forward step,
    log-probs and losses are the same code for both layouts.
    """
    keys = None
    if not shared_prefix:
        groups, keys = split_responses(groups)
    packed = pack_groups(groups, max_tokens=max_tokens, max_seq_len=max_seq_len)
    if keys is not None:
        for p in packed:
            p.response_keys = [keys[j] for j, _ in p.response_keys]  # singleton j -> (group, response)
    length = max(local_length(p, cp_size=cp_size, pad_multiple=pad_multiple) for p in packed)
    batches = []
    for p in packed:
        locals_ = [build_local(p, cp_size=cp_size, cp_rank=r, pad_multiple=pad_multiple, min_length=length)
                   for r in range(cp_size)]
        tokens = torch.cat([lb.tokens for lb in locals_]).unsqueeze(0)  # (1, CP*T)
        batches.append({"tokens": tokens, "locals": locals_, "kernel": kernel})
    return batches


def response_logprobs(logits: torch.Tensor, local: LocalBatch, *, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """log p of every local response token, (N_local,) fp32, from TP rank ``tp_rank``'s logits (1, T, V/TP)."""
    rows = logits[0].index_select(0, local.logit_index.to(logits.device))  # (N, V/TP)
    return vocab_parallel_logprobs(rows, local.targets.to(logits.device), vocab_size=vocab_size, tp_rank=tp_rank)


def response_values(output: torch.Tensor, local: LocalBatch) -> torch.Tensor:
    """The critic's value of every local response token, (N_local,) fp32, from its output (1, T, 1):
    read at ``logit_index``, the position whose logits predict the token (its state)."""
    return output[0, :, 0].index_select(0, local.logit_index.to(output.device)).float()


def padded(per_token: torch.Tensor, local: LocalBatch, *, fill: float = 0.0) -> tuple:
    """(B_local, T_max) right-padded view of an (N_local,) tensor, and its (B_local, T_max) mask."""
    parts = local.split_responses(per_token)
    width = max([p.numel() for p in parts] + [1])
    out = per_token.new_full((len(parts), width), fill)
    mask = torch.zeros(len(parts), width, dtype=torch.bool, device=per_token.device)
    for b, p in enumerate(parts):
        out[b, :p.numel()] = p
        mask[b, :p.numel()] = True
    return out, mask


def pg_loss(logp: torch.Tensor, local: LocalBatch) -> tuple:
    """Default loss: advantage-weighted log-likelihood, summed (megatron per-token convention)."""
    adv = local.advantages.to(logp.device)
    loss_sum = -(adv * logp).sum()
    n = torch.tensor(logp.numel(), dtype=torch.int)
    return loss_sum, n, {"loss_sum": loss_sum.detach().clone(), "tokens": n.clone()}


LossFn = Callable[[torch.Tensor, LocalBatch], tuple]


def make_forward_fn(loss: LossFn = pg_loss, *, values: bool = False) -> Callable:
    """``forward_fn(model, batch) -> (output, loss_fn)`` over a :func:`make_batches` micro-batch.

    ``values=True`` runs a critic (``build_gpt(value_head=True)``): the loss and the metrics
    see its per-token values (:func:`response_values`) where a policy's log-probs would be.

    ``loss(logp (N_local,), local) -> (loss_sum, normaliser, metrics)``; the metrics also get
    ``logp`` (detached), ``keys`` (the (group, response) of each local response) and ``sizes``
    (its token count); :func:`collect_logprobs` turns them into per-response tensors. The cp
    and tp ranks come from the model's ``pg_collection`` (the topology's groups). A model with a
    ``route_control`` (``TrainEngine(routes=...)``) first gets the micro-batch's MoE routes.
    """
    def forward_fn(model, batch: dict):
        gpt = unwrap(model)
        device = next(gpt.parameters()).device
        groups = model_groups(gpt)
        local = batch["locals"][group_rank(groups.cp)]
        routing = getattr(gpt, "route_control", None)  # routing replay / route mismatch (train/routing.py)
        if routing is not None:
            routing.load(local, tp_rank=group_rank(groups.tp), tp_size=group_size(groups.tp),
                         sequence_parallel=gpt.config.sequence_parallel)
        params = SharedPrefixParams.from_local(local, device=device, kernel=batch.get("kernel", "auto"))
        tokens = local.tokens.to(device).unsqueeze(0)  # (1, T)
        output = model(tokens, local.position_ids.to(device).unsqueeze(0), attention_mask=None,
                       packed_seq_params=params)

        def loss_fn(logits):
            logp = (response_values(logits, local) if values else
                    response_logprobs(logits, local, vocab_size=gpt.unpadded_vocab_size, tp_rank=group_rank(groups.tp)))
            loss_sum, n, metrics = loss(logp, local)
            sizes = (local.response_cu[1:] - local.response_cu[:-1]).tolist()
            metrics = dict(metrics, logp=logp.detach(), keys=list(local.response_keys), sizes=sizes)
            return loss_sum, n, metrics

        return output, loss_fn

    return forward_fn


def collect_logprobs(metrics: list, *, cp_group=None) -> dict:
    """``{(group, response): (R,) log-probs}`` from forward metrics, merged over the CP group.

    Log-probs are small (one float per response token), so the CP merge uses an object gather.
    """
    mine = {}
    for m in metrics:
        for key, part in zip(m["keys"], torch.split(m["logp"].cpu(), m["sizes"])):
            mine[tuple(key)] = part
    if cp_group is None or torch.distributed.get_world_size(cp_group) == 1:
        return mine
    gathered = coll.all_gather_object(mine, group=cp_group)
    out = {}
    for part in gathered:
        out.update(part)
    return out
