"""Shared-prefix packing: a batch of GRPO groups becomes pad-free sequences ``[P, R1, ..., RG]``.

A *group* is one prompt sampled G times. Naive packing runs ``[P, R_i]`` G times; here the
prompt appears once and every response follows it, so the network sees ``P + sum(R_i)``
tokens instead of ``G*P + sum(R_i)``. Several groups share one micro-batch back to back,
without padding (``pack_groups`` splits a batch into micro-batches of at most
``max_tokens`` tokens, keeping the groups in order).

Layout of one micro-batch (canonical order, before any context-parallel sharding)::

    tokens       p0 p1 p2 | a0 a1 | b0 b1 b2 || q0 q1 | c0 ...
    position_ids  0  1  2 |  3  4 |  3  4  5 ||  0  1 |  2 ...     (responses restart at len(P))
    response_id  -1 -1 -1 |  0  0 |  1  1  1 || -1 -1 |  0 ...     (-1 = prompt)
    group_id      0  0  0 |  0  0 |  0  0  0 ||  1  1 |  1 ...

The log-prob of response token ``j`` comes from the logits at ``logit_index[n]``: the
previous response token, or for ``j == 0`` the last prompt token (shared by all G
responses). ``targets``, ``advantages`` and ``token_index`` run over the same axis ``n``
(all response tokens, response by response); ``response_cu`` cuts it back per response.

Edge cases (documented behaviour, tested):
  * a response of length 0 occupies no tokens and yields an empty log-prob tensor;
  * an empty prompt, a group with no responses, or ``len(P) + max(R_i) > max_seq_len`` is a
    ``PackingError`` naming the group and the fix, raised before any work;
  * a group longer than ``max_tokens`` is an error (raise ``max_tokens`` or use CP).

Usage::

    mbs = pack_groups([Group(prompt=[5, 6, 7], responses=[[8, 9], [10]], advantages=[0.5, -0.5])],
                      max_tokens=4096, max_seq_len=2048)
    mb = mbs[0]       # PackedBatch: tokens, position_ids, logit_index, targets, ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


class PackingError(ValueError):
    """Bad packing input. The message names the group/field and the fix."""


@dataclass(frozen=True)
class Group:
    """One prompt and its G sampled responses (token ids), with one advantage per response.

    ``advantages`` may also hold one sequence per response (per-token weights).
    ``None`` means weight 1.0 for every token.

    ``prompt_routes`` (P, L, k) and ``response_routes`` (one (R_i, L, k) per response): the MoE
    routes to replay (routing replay), a per-token payload packed exactly as the tokens are.
    """

    prompt: Sequence[int]
    responses: Sequence[Sequence[int]]
    advantages: Sequence | None = None
    prompt_routes: torch.Tensor | None = None
    response_routes: Sequence[torch.Tensor] | None = None


class _ResponseRows:
    """Shared by packed batches that hold ``tokens`` and ``response_cu`` (response offsets)."""

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def split_responses(self, per_token: torch.Tensor) -> list:
        """Cut a tensor over the response-token axis N (dim 0) into one tensor per response."""
        cu = self.response_cu.tolist()
        return [per_token[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]


@dataclass
class PackedBatch(_ResponseRows):
    """One pad-free shared-prefix micro-batch (canonical order). All tensors are on CPU.

    Per packed position (length T): ``tokens``, ``position_ids``, ``group_id``,
    ``response_id`` (-1 = prompt), ``loss_mask`` (positions whose logits are used).
    Per response token (length N): ``logit_index``, ``token_index``, ``targets``,
    ``advantages``. Per response: ``response_cu`` (N-offsets, length n_resp+1) and
    ``response_keys`` ((batch group index, response index) pairs).
    Per group in this micro-batch: ``group_starts``, ``prompt_lens``, ``response_lens``.
    With routes (every group has them): ``routes`` (T, L, k) and ``route_valid`` (T,): False
    on each response's final token, which the rollout never routed (``rollout/routes.py``).
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    group_id: torch.Tensor
    response_id: torch.Tensor
    loss_mask: torch.Tensor
    logit_index: torch.Tensor
    token_index: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    response_cu: torch.Tensor
    response_keys: list = field(default_factory=list)
    group_indices: list = field(default_factory=list)
    group_starts: list = field(default_factory=list)
    prompt_lens: list = field(default_factory=list)
    response_lens: list = field(default_factory=list)
    routes: torch.Tensor | None = None
    route_valid: torch.Tensor | None = None


def group_tokens(group: Group) -> int:
    """Tokens a group occupies when packed with a shared prefix: ``P + sum(R_i)``."""
    return len(group.prompt) + sum(len(r) for r in group.responses)


def naive_tokens(group: Group) -> int:
    """Tokens the naive layout (G copies of ``[P, R_i]``) runs: ``G*P + sum(R_i)``."""
    return len(group.responses) * len(group.prompt) + sum(len(r) for r in group.responses)


def validate_groups(groups: Sequence[Group], *, max_seq_len: int | None, max_tokens: int | None) -> None:
    """Raise ``PackingError`` for the first bad group, naming it and the fix."""
    if not groups:
        raise PackingError("groups is empty; pass at least one Group")
    for g, group in enumerate(groups):
        plen = len(group.prompt)
        if plen == 0:
            raise PackingError(f"groups[{g}].prompt is empty; a shared prefix needs >= 1 token "
                               "(the first response token is predicted from the last prompt token)")
        if len(group.responses) == 0:
            raise PackingError(f"groups[{g}].responses is empty; a group needs >= 1 response")
        longest = max(len(r) for r in group.responses)
        if max_seq_len is not None and plen + longest > max_seq_len:
            raise PackingError(
                f"groups[{g}]: prompt ({plen}) + longest response ({longest}) = {plen + longest} tokens "
                f"> max_seq_len={max_seq_len}; fix: truncate the prompt/response or raise max_seq_len")
        if max_tokens is not None and group_tokens(group) > max_tokens:
            raise PackingError(
                f"groups[{g}] packs to {group_tokens(group)} tokens > max_tokens={max_tokens}; "
                "fix: raise max_tokens, or use context parallelism (cp>1 splits the prompt over ranks)")
        if group.advantages is not None and len(group.advantages) != len(group.responses):
            raise PackingError(f"groups[{g}].advantages has {len(group.advantages)} entries for "
                               f"{len(group.responses)} responses; give one per response")
        for i, adv in enumerate(group.advantages or ()):
            if isinstance(adv, (list, tuple, torch.Tensor)) and len(adv) != len(group.responses[i]):
                raise PackingError(f"groups[{g}].advantages[{i}] has {len(adv)} per-token weights for a "
                                   f"response of {len(group.responses[i])} tokens")
        _check_routes(g, group, with_routes=groups[0].prompt_routes is not None)


def _check_routes(g: int, group: Group, *, with_routes: bool) -> None:
    if (group.prompt_routes is not None) != with_routes or (group.response_routes is not None) != with_routes:
        raise PackingError(f"groups[{g}]: routes on some groups only; give prompt_routes and response_routes "
                           "to every group or to none")
    if not with_routes:
        return
    lens = [len(group.prompt)] + [len(r) for r in group.responses]
    got = [group.prompt_routes.shape[0]] + [r.shape[0] for r in group.response_routes]
    if got != lens or group.prompt_routes.dim() != 3:
        raise PackingError(f"groups[{g}]: routes cover {got} tokens (prompt, responses) for {lens}; "
                           "give one (L, k) route per token")


def _token_weights(group: Group, i: int) -> list:
    n = len(group.responses[i])
    if group.advantages is None:
        return [1.0] * n
    adv = group.advantages[i]
    if isinstance(adv, (list, tuple, torch.Tensor)):
        return [float(a) for a in adv]
    return [float(adv)] * n


def pack_one(groups: Sequence[Group], *, group_indices: Sequence[int] | None = None) -> PackedBatch:
    """Pack ``groups`` back to back into one micro-batch (no validation; see ``pack_groups``)."""
    tokens, pos, gid, rid = [], [], [], []
    logit_index, token_index, targets, weights, cu, keys = [], [], [], [], [0], []
    starts, plens, rlens = [], [], []
    indices = list(group_indices) if group_indices is not None else list(range(len(groups)))
    for local_g, group in enumerate(groups):
        start, plen = len(tokens), len(group.prompt)
        starts.append(start)
        plens.append(plen)
        rlens.append([len(r) for r in group.responses])
        tokens += [int(t) for t in group.prompt]
        pos += range(plen)
        gid += [local_g] * plen
        rid += [-1] * plen
        last_prompt = start + plen - 1
        for i, resp in enumerate(group.responses):
            first = len(tokens)
            n = len(resp)
            tokens += [int(t) for t in resp]
            pos += range(plen, plen + n)
            gid += [local_g] * n
            rid += [i] * n
            # token j is predicted by the logits of token j-1; token 0 by the last prompt token
            if n:
                logit_index += [last_prompt] + list(range(first, first + n - 1))
            token_index += range(first, first + n)
            targets += [int(t) for t in resp]
            weights += _token_weights(group, i)
            cu.append(cu[-1] + n)
            keys.append((indices[local_g], i))
    loss_mask = torch.zeros(len(tokens), dtype=torch.bool)
    loss_mask[torch.tensor(logit_index, dtype=torch.long)] = True
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    routes, valid = _pack_routes(groups)
    return PackedBatch(routes=routes, route_valid=valid, tokens=long(tokens), position_ids=long(pos), group_id=long(gid),
                       response_id=long(rid), loss_mask=loss_mask, logit_index=long(logit_index),
                       token_index=long(token_index), targets=long(targets),
                       advantages=torch.tensor(weights, dtype=torch.float32), response_cu=long(cu),
                       response_keys=keys, group_indices=indices, group_starts=starts,
                       prompt_lens=plens, response_lens=rlens)


def _pack_routes(groups: Sequence[Group]) -> tuple:
    """(T, L, k) routes and (T,) validity in the token order of :func:`pack_one` (or None, None)."""
    if groups[0].prompt_routes is None:
        return None, None
    parts, valid = [], []
    for group in groups:
        parts.append(group.prompt_routes)
        valid.append(torch.ones(len(group.prompt), dtype=torch.bool))
        for r in group.response_routes:
            parts.append(r)
            v = torch.ones(r.shape[0], dtype=torch.bool)
            v[-1:] = False  # the final sampled token: never routed by the rollout
            valid.append(v)
    return torch.cat(parts).to(torch.long), torch.cat(valid)


def pack_groups(groups: Sequence[Group], *, max_tokens: int, max_seq_len: int | None = None) -> list:
    """Split ``groups`` (in order) into pad-free shared-prefix micro-batches of <= ``max_tokens``.

    Greedy and order-preserving: a group goes into the current micro-batch if it fits,
    otherwise it starts a new one. Every input error is raised before any packing.
    """
    if max_tokens < 1:
        raise PackingError(f"max_tokens must be >= 1, got {max_tokens}")
    validate_groups(groups, max_seq_len=max_seq_len, max_tokens=max_tokens)
    batches, current, used = [], [], 0
    for g, group in enumerate(groups):
        n = group_tokens(group)
        if current and used + n > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(g)
        used += n
    batches.append(current)
    return [pack_one([groups[g] for g in idx], group_indices=idx) for idx in batches]


def pack_naive(groups: Sequence[Group]) -> tuple:
    """The baseline layout: one row ``[P, R_i]`` per response, right-padded with 0.

    Returns ``(tokens (B, S), position_ids (B, S), lengths list)``; row b is response
    ``keys[b] = (group index, response index)``. Used by the benchmark and the tests.
    """
    rows, keys = [], []
    for g, group in enumerate(groups):
        for i, resp in enumerate(group.responses):
            rows.append([int(t) for t in group.prompt] + [int(t) for t in resp])
            keys.append((g, i))
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)  # (B, S)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    position_ids = torch.arange(width).expand(len(rows), width).clone()  # (B, S)
    return tokens, position_ids, [len(r) for r in rows], keys
