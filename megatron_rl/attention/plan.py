"""Per-rank layout and attention plan of a shared-prefix micro-batch (pure: no process group).

``build_local(packed, cp_size=C, cp_rank=r)`` turns a canonical ``PackedBatch`` into what
rank ``r`` feeds the model: its tokens, position ids, the log-prob index map, and an
``AttentionPlan`` describing exactly which keys every local query attends to.

Key space. With ``cp_size == 1`` the keys are the local tokens themselves. With CP, each
rank all-gathers the K/V of the *prompt section* (its first ``prompt_slots`` local rows)
over the CP group; ``gather_index`` reorders the gathered rows into the canonical prompt
order (all prompts back to back), and the key space is ``[canonical prompts ; local rows]``.

CP sharding (per group):
  * the prompt is cut into ``2*C`` chunks; rank r holds chunks r and 2C-1-r, so the causal
    prompt work is balanced (the same zig-zag megatron uses);
  * every response lives whole on one rank (longest first onto the least-loaded rank), so
    it needs only the gathered prompt and its own local K/V (an empty response is assigned
    too, with no rows, so every response key appears on exactly one rank);
  * a rank that holds responses of a group but not its last prompt token gets a query-only
    copy of that token (its K/V are never used as keys), whose logits predict the first
    token of each of those responses;
  * every rank is padded to the same length, so collectives and pipeline shapes agree.

Attention tasks. ``plan.tasks`` lists ``(q0, q1, k0, k1, causal)``: local query rows
``[q0, q1)`` attend to key-space rows ``[k0, k1)``, causally (top-left aligned, equal
lengths) or densely. A row attended by several tasks merges them by log-sum-exp. No mask is
ever materialised. ``plan.q_meta`` / ``plan.k_meta`` describe the same rule per token for
mask-based kernels (FlexAttention): query row q may see key k iff
``kvalid & qg == kg & ((kr == -1 & (qr != -1 | kp <= qp)) | (kr == qr & kp <= qp))``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_rl.attention.packing import PackedBatch, PackingError, _ResponseRows

PAD_GROUP = -2  # group/response id of pad rows; pads attend causally among their own block


@dataclass
class AttentionPlan:
    """Which keys each local query attends to. See the module docstring."""

    tasks: list
    num_queries: int
    num_keys: int
    cp_size: int = 1
    prompt_slots: int = 0          # local rows all-gathered over CP (0 when cp_size == 1)
    gather_index: torch.Tensor | None = None  # (sum P,) rows of the gathered (C*slots) tensor
    q_meta: dict = field(default_factory=dict)  # group, resp, pos (local rows)
    k_meta: dict = field(default_factory=dict)  # group, resp, pos, valid (key space)


@dataclass
class LocalBatch(_ResponseRows):
    """What one rank feeds the model for one micro-batch.

    ``tokens``/``position_ids``: (T_local,). ``logit_index``/``targets``/``advantages``:
    (N_local,) over this rank's response tokens; ``response_cu`` cuts them per response and
    ``response_keys`` names each (batch group index, response index).
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    logit_index: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    response_cu: torch.Tensor
    response_keys: list
    plan: AttentionPlan
    global_index: torch.Tensor  # (T_local,) canonical position each row computes (copies repeat
    #                             the last prompt token); -1 for pad
    routes: torch.Tensor | None = None       # (T_local, L, k) MoE routes of every row (routing replay)
    route_counted: torch.Tensor | None = None  # (T_local,) rows the route-mismatch metric counts


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _assign_responses(packed: PackedBatch, cp_size: int) -> list:
    """rank of every (local group, response): longest first onto the least-loaded rank."""
    load = [0] * cp_size
    for g, plen in enumerate(packed.prompt_lens):  # prompt tokens are already balanced
        for r in range(cp_size):
            load[r] += sum(_chunk(plen, c, cp_size)[1] - _chunk(plen, c, cp_size)[0]
                           for c in (r, 2 * cp_size - 1 - r))
    owner = {}
    items = [(n, g, i) for g, lens in enumerate(packed.response_lens) for i, n in enumerate(lens)]
    for n, g, i in sorted(items, key=lambda x: (-x[0], x[1], x[2])):
        r = min(range(cp_size), key=lambda k: (load[k], k))
        owner[(g, i)] = r
        load[r] += n
    return owner


def _chunk(plen: int, c: int, cp_size: int) -> tuple:
    """[start, end) of prompt chunk c of 2*cp_size near-equal chunks."""
    n = 2 * cp_size
    return c * plen // n, (c + 1) * plen // n


def _meta(rows: list) -> dict:
    cols = list(zip(*rows)) if rows else [(), (), (), ()]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in zip(("group", "resp", "pos", "valid"), cols)}


def local_length(packed: PackedBatch, *, cp_size: int = 1, pad_multiple: int = 1) -> int:
    """Rows every CP rank holds for ``packed`` (before any ``min_length``)."""
    if cp_size == 1:
        return _round_up(packed.num_tokens, pad_multiple)
    layouts = [_cp_rows(packed, cp_size=cp_size, cp_rank=r) for r in range(cp_size)]
    slots = max(len(lay["prompt"]) for lay in layouts)
    return _round_up(max(slots + _rest_len(packed, lay) for lay in layouts), pad_multiple)


def build_local(packed: PackedBatch, *, cp_size: int = 1, cp_rank: int = 0, pad_multiple: int = 1,
                min_length: int = 0) -> LocalBatch:
    """This rank's share of ``packed``; see the module docstring for the layout.

    Every CP rank gets the same number of rows: a multiple of ``pad_multiple`` (e.g. TP with
    sequence parallelism) and at least ``min_length`` (equal shapes across micro-batches for PP).
    """
    if not 0 <= cp_rank < cp_size:
        raise PackingError(f"cp_rank={cp_rank} out of range for cp_size={cp_size}")
    length = max(local_length(packed, cp_size=cp_size, pad_multiple=pad_multiple), min_length)
    if cp_size == 1:
        return _with_routes(_build_single(packed, length=length), packed)
    layouts = [_cp_rows(packed, cp_size=cp_size, cp_rank=r) for r in range(cp_size)]
    slots = max(len(lay["prompt"]) for lay in layouts)
    local = _build_cp(packed, layouts, cp_size=cp_size, cp_rank=cp_rank, slots=slots, length=length)
    return _with_routes(local, packed)


def _with_routes(local: LocalBatch, packed: PackedBatch) -> LocalBatch:
    """Every row's route is the route of the canonical position it computes (``global_index``):
    the same map as its token. Pad rows get experts ``0..k-1``; the metric counts neither pads,
    nor CP's query-only copies of a last prompt token (rank 0 counts that token), nor tokens
    without a rollout route (``packed.route_valid``)."""
    if packed.routes is None:
        return local
    gidx = local.global_index
    real = gidx >= 0
    routes = packed.routes[gidx.clamp(min=0)]  # (T_local, L, k)
    k = routes.shape[-1]
    routes[~real] = torch.arange(k, dtype=routes.dtype)
    counted = real & packed.route_valid[gidx.clamp(min=0)]
    if local.plan.cp_size > 1:  # rows past the prompt section that hold a prompt token are copies
        rows = torch.arange(gidx.numel())
        counted &= ~((rows >= local.plan.prompt_slots) & (local.plan.q_meta["resp"] == -1))
    local.routes, local.route_counted = routes, counted
    return local


def _rest_len(packed: PackedBatch, lay: dict) -> int:
    return sum(1 if item[0] == "copy" else packed.response_lens[item[1]][item[2]] for item in lay["rest"])


def _build_single(packed: PackedBatch, *, length: int) -> LocalBatch:
    t = packed.num_tokens
    tasks = []
    for g, start in enumerate(packed.group_starts):
        plen = packed.prompt_lens[g]
        tasks.append((start, start + plen, start, start + plen, True))
        first = start + plen
        end = first + sum(packed.response_lens[g])
        if end > first:
            tasks.append((first, end, start, start + plen, False))
        for n in packed.response_lens[g]:
            if n:
                tasks.append((first, first + n, first, first + n, True))
            first += n
    if length > t:
        tasks.append((t, length, t, length, True))
    pad = length - t
    group = torch.cat([packed.group_id, torch.full((pad,), PAD_GROUP)])
    resp = torch.cat([packed.response_id, torch.full((pad,), PAD_GROUP)])
    pos = torch.cat([packed.position_ids, torch.arange(t, length)])
    q_meta = {"group": group, "resp": resp, "pos": pos}
    k_meta = dict(q_meta, valid=torch.ones(length, dtype=torch.long))
    plan = AttentionPlan(tasks=tasks, num_queries=length, num_keys=length, q_meta=q_meta, k_meta=k_meta)
    tokens = torch.cat([packed.tokens, torch.zeros(pad, dtype=torch.long)])
    position_ids = torch.cat([packed.position_ids, torch.zeros(pad, dtype=torch.long)])
    global_index = torch.cat([torch.arange(t), torch.full((pad,), -1)])
    return LocalBatch(tokens=tokens, position_ids=position_ids, logit_index=packed.logit_index,
                      targets=packed.targets, advantages=packed.advantages, response_cu=packed.response_cu,
                      response_keys=list(packed.response_keys), plan=plan, global_index=global_index)


def _cp_rows(packed: PackedBatch, *, cp_size: int, cp_rank: int) -> dict:
    """Canonical positions this rank holds: prompt section, then (copy, responses) per group."""
    owner = _assign_responses(packed, cp_size)
    prompt, rest = [], []   # rest: ("copy", g) | ("resp", g, i)
    for g, start in enumerate(packed.group_starts):
        plen = packed.prompt_lens[g]
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            a, b = _chunk(plen, c, cp_size)
            prompt += [(g, start + p) for p in range(a, b)]
    for g, start in enumerate(packed.group_starts):
        lens = packed.response_lens[g]
        mine = [i for i in range(len(lens)) if owner[(g, i)] == cp_rank]  # empty ones too: no rows
        if cp_rank != 0 and any(lens[i] for i in mine):  # rank 0 holds the last prompt token
            rest.append(("copy", g))
        rest += [("resp", g, i) for i in mine]
    return {"prompt": prompt, "rest": rest}


def _build_cp(packed: PackedBatch, layouts: list, *, cp_size: int, cp_rank: int, slots: int,
              length: int) -> LocalBatch:
    lay = layouts[cp_rank]
    offsets = [0]
    for plen in packed.prompt_lens:
        offsets.append(offsets[-1] + plen)
    key_local = offsets[-1]  # key-space offset of the local rows
    # gathered row of every canonical prompt token: rank r's slot j is row r*slots + j
    gather_index = torch.empty(key_local, dtype=torch.long)
    for r, other in enumerate(layouts):
        for j, (g, canon) in enumerate(other["prompt"]):
            gather_index[offsets[g] + canon - packed.group_starts[g]] = r * slots + j
    q_rows, k_rows, global_index, tasks = [], [], [], []
    for j, (g, canon) in enumerate(lay["prompt"]):
        p = canon - packed.group_starts[g]
        q_rows.append((g, -1, p))
        k_rows.append((g, -1, p, 0))
        global_index.append(canon)
    # prompt chunks: dense over the prompt before the chunk, causal within it
    row = 0
    for g in range(len(packed.group_starts)):
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            a, b = _chunk(packed.prompt_lens[g], c, cp_size)
            if b == a:
                continue
            if a > 0:
                tasks.append((row, row + b - a, offsets[g], offsets[g] + a, False))
            tasks.append((row, row + b - a, offsets[g] + a, offsets[g] + b, True))
            row += b - a
    _pad_rows(q_rows, k_rows, global_index, tasks, upto=slots, key_local=key_local)
    last_row, resp_rows = {}, {}
    for item in lay["rest"]:
        g, r0 = item[1], len(q_rows)
        plen = packed.prompt_lens[g]
        if item[0] == "copy":
            q_rows.append((g, -1, plen - 1))
            k_rows.append((g, -1, plen - 1, 0))
            global_index.append(packed.group_starts[g] + plen - 1)
            tasks.append((r0, r0 + 1, offsets[g], offsets[g] + plen, False))
            last_row[g] = r0
            continue
        i = item[2]
        n = packed.response_lens[g][i]
        q_rows += [(g, i, plen + j) for j in range(n)]
        k_rows += [(g, i, plen + j, 1) for j in range(n)]
        first = packed.group_starts[g] + plen + sum(packed.response_lens[g][:i])
        global_index += range(first, first + n)
        if n:
            tasks.append((r0, r0 + n, offsets[g], offsets[g] + plen, False))
            tasks.append((r0, r0 + n, key_local + r0, key_local + r0 + n, True))
        resp_rows[(g, i)] = r0
    _pad_rows(q_rows, k_rows, global_index, tasks, upto=length, key_local=key_local)
    for g in range(len(packed.group_starts)):  # rank 0 predicts from its own last prompt row
        if cp_rank == 0:
            last_row[g] = next(j for j, (gg, canon) in enumerate(lay["prompt"])
                               if gg == g and canon == packed.group_starts[g] + packed.prompt_lens[g] - 1)
    return _finish_cp(packed, q_rows, k_rows, global_index, tasks, resp_rows, last_row,
                      cp_size=cp_size, slots=slots, gather_index=gather_index, key_local=key_local)


def _pad_rows(q_rows, k_rows, global_index, tasks, *, upto: int, key_local: int) -> None:
    start = len(q_rows)
    for j in range(start, upto):
        q_rows.append((PAD_GROUP, PAD_GROUP, j))
        k_rows.append((PAD_GROUP, PAD_GROUP, j, 1))
        global_index.append(-1)
    if upto > start:
        tasks.append((start, upto, key_local + start, key_local + upto, True))


def _finish_cp(packed, q_rows, k_rows, global_index, tasks, resp_rows, last_row, *, cp_size, slots,
               gather_index, key_local) -> LocalBatch:
    canon_k = [(g, -1, p, 1) for g, plen in enumerate(packed.prompt_lens) for p in range(plen)]
    q_meta = {k: v for k, v in _meta([r + (1,) for r in q_rows]).items() if k != "valid"}
    plan = AttentionPlan(tasks=tasks, num_queries=len(q_rows), num_keys=key_local + len(q_rows),
                         cp_size=cp_size, prompt_slots=slots, gather_index=gather_index,
                         q_meta=q_meta, k_meta=_meta(canon_k + k_rows))
    gidx = torch.tensor(global_index, dtype=torch.long)
    tokens = torch.where(gidx >= 0, packed.tokens[gidx.clamp(min=0)], 0)
    position_ids = torch.where(q_meta["resp"] == PAD_GROUP, 0, q_meta["pos"])
    logit_index, targets, advantages, cu, keys = [], [], [], [0], []
    cu_all = packed.response_cu.tolist()
    n = 0
    for g, lens in enumerate(packed.response_lens):
        for i, length in enumerate(lens):
            if (g, i) in resp_rows:
                r0 = resp_rows[(g, i)]
                if length:
                    logit_index += [last_row[g]] + list(range(r0, r0 + length - 1))
                targets.append(packed.targets[cu_all[n]:cu_all[n + 1]])
                advantages.append(packed.advantages[cu_all[n]:cu_all[n + 1]])
                cu.append(cu[-1] + length)
                keys.append(packed.response_keys[n])
            n += 1
    cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt)  # noqa: E731
    return LocalBatch(tokens=tokens, position_ids=position_ids,
                      logit_index=torch.tensor(logit_index, dtype=torch.long),
                      targets=cat(targets, torch.long), advantages=cat(advantages, torch.float32),
                      response_cu=torch.tensor(cu, dtype=torch.long), response_keys=keys, plan=plan,
                      global_index=gidx)
