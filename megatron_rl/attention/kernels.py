"""Attention kernels for an ``AttentionPlan``: a blocked CPU path, a FlexAttention path, a reference.

* :func:`task_attention` (CPU, and any device with a flash kernel that returns its
  log-sum-exp): runs every plan task ``(q0, q1, k0, k1, causal)`` with the fused flash
  kernel, merges tasks that share query rows by log-sum-exp, and in backward runs the
  flash backward of every task against the *merged* output and log-sum-exp (the same
  identity ring attention uses), summing dQ/dK/dV. Nothing quadratic in the packed length
  is materialised; a response block attends to ``[prompt]`` (dense) and ``[itself]``
  (causal) as two tasks.
* :func:`flex_attention_plan` (CUDA): one compiled FlexAttention call whose block mask is built
  (compiled, sparse) from the plan's per-token metadata; fully masked 128x128 blocks are skipped
  by the kernel. Lengths are padded to power-of-two buckets (pads masked out) and compiled with
  automatic dynamic shapes on CUDA, so changing packed lengths compile at most twice.
* :func:`reference_attention`: dense masked softmax from the same metadata, for tests only.

All take ``q (Tq, H, D)``, ``k/v (Tk, Hk, D)`` with ``H % Hk == 0`` (GQA) and return
``(Tq, H, D)``.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention import flex_attention as fa


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 0, 2).unsqueeze(0)  # (T, H, D) -> (1, H, T, D)


class _TaskAttention(torch.autograd.Function):
    """Blocked attention over plan tasks; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, tasks, scale):
        qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)  # (1, H, T, D)
        out = torch.zeros(q.size(1), q.size(0), q.size(2), dtype=q.dtype, device=q.device)  # (H, Tq, D)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.full((q.size(1), q.size(0)), float("-inf"), dtype=lse_dtype, device=q.device)  # (H, Tq)
        for q0, q1, k0, k1, causal in tasks:
            o_t, l_t = _flash(qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1], 0.0, causal, scale=scale)
            o_t, l_t = o_t[0], l_t[0]  # (H, L, D), (H, L)
            prev = lse[:, q0:q1]
            if torch.isneginf(prev).all():
                out[:, q0:q1] = o_t
                lse[:, q0:q1] = l_t
                continue
            new = torch.logaddexp(prev, l_t)
            out[:, q0:q1] = (out[:, q0:q1] * torch.exp(prev - new).unsqueeze(-1).to(out.dtype)
                             + o_t * torch.exp(l_t - new).unsqueeze(-1).to(out.dtype))
            lse[:, q0:q1] = new
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tasks, ctx.scale = tasks, scale
        return out.permute(1, 0, 2)  # (Tq, H, D)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
        gh = _heads_first(grad.contiguous())  # (1, H, Tq, D)
        oh, lh = out.unsqueeze(0), lse.unsqueeze(0)
        dq = torch.zeros_like(qh)
        dk = torch.zeros_like(kh)
        dv = torch.zeros_like(vh)
        for q0, q1, k0, k1, causal in ctx.tasks:
            dq_t, dk_t, dv_t = _flash_bwd(gh[:, :, q0:q1], qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1],
                                          oh[:, :, q0:q1], lh[:, :, q0:q1].contiguous(), 0.0, causal,
                                          scale=ctx.scale)
            dq[:, :, q0:q1] += dq_t
            dk[:, :, k0:k1] += dk_t
            dv[:, :, k0:k1] += dv_t
        back = lambda x: x[0].permute(1, 0, 2)  # noqa: E731  (1, H, T, D) -> (T, H, D)
        return back(dq), back(dk), back(dv), None, None


def task_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tasks: list, scale: float) -> torch.Tensor:
    """Blocked flash attention over ``tasks``; rows in no task give zeros."""
    return _TaskAttention.apply(q, k, v, tasks, scale)


def allowed(q_meta: dict, k_meta: dict, qi, ki):
    """The shared-prefix visibility rule, elementwise over query rows ``qi`` and keys ``ki``."""
    qg, qr, qp = q_meta["group"][qi], q_meta["resp"][qi], q_meta["pos"][qi]
    kg, kr, kp, kv = k_meta["group"][ki], k_meta["resp"][ki], k_meta["pos"][ki], k_meta["valid"][ki]
    causal = kp <= qp
    prompt_key = (kr == -1) & ((qr != -1) | causal)
    own = (kr == qr) & causal
    return (kv > 0) & (qg == kg) & (prompt_key | own)


def reference_attention(q, k, v, *, q_meta: dict, k_meta: dict, scale: float) -> torch.Tensor:
    """Dense masked attention (O(Tq*Tk) mask): the test oracle for the other paths."""
    qi = torch.arange(q.size(0), device=q.device)[:, None]
    ki = torch.arange(k.size(0), device=q.device)[None, :]
    keep = allowed(q_meta, k_meta, qi, ki)  # (Tq, Tk)
    rep = q.size(1) // k.size(1)
    kk = k.repeat_interleave(rep, dim=1).permute(1, 2, 0)  # (H, D, Tk)
    vv = v.repeat_interleave(rep, dim=1).permute(1, 0, 2)  # (H, Tk, D)
    scores = torch.matmul(q.permute(1, 0, 2), kk).float() * scale  # (H, Tq, Tk)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)
    return torch.matmul(probs, vv).permute(1, 0, 2)  # (Tq, H, D)


FLEX_BLOCK = 128   # FlexAttention's sparse block size: the smallest bucket
_BUCKET_PAD = -3   # group id of bucket-pad rows: matches no real or plan-pad row, so they are masked out


def flex_bucket(n: int) -> int:
    """The padded length FlexAttention runs for ``n`` rows: the next power of two >= ``n``
    (at least ``FLEX_BLOCK``). Pad rows fill only fully masked blocks, which the kernel skips,
    so the padding costs memory for Q/K/V (< 2x) but no attention work; greedy packing keeps
    a run's lengths within about one octave of ``max_tokens``, i.e. one or two buckets."""
    return max(FLEX_BLOCK, 1 << max(0, n - 1).bit_length())


def _pad_meta(meta: dict, length: int) -> dict:
    pad = length - len(meta["pos"])
    fill = {"group": _BUCKET_PAD, "resp": _BUCKET_PAD, "pos": 0, "valid": 0}
    return {n: torch.cat([t, t.new_full((pad,), fill[n])]) for n, t in meta.items()}


def flex_block_mask(q_meta: dict, k_meta: dict, *, device):
    """A FlexAttention ``BlockMask`` for the plan (build once per micro-batch, reuse per layer).

    Query and key lengths are padded up to :func:`flex_bucket` (pad keys invalid, pad queries
    in no group), so packed lengths that change every step give few distinct shapes. The mask
    is built by a compiled ``create_block_mask``: block by block, never as a dense Tq x Tk tensor.
    """
    tq, tk = flex_bucket(len(q_meta["pos"])), flex_bucket(len(k_meta["pos"]))
    qm = {n: t.to(device) for n, t in _pad_meta(q_meta, tq).items()}
    km = {n: t.to(device) for n, t in _pad_meta(k_meta, tk).items()}

    def mask_mod(b, h, qi, ki):
        return allowed(qm, km, qi, ki)

    return _compiled("create_block_mask", _flex_dynamic(device))(mask_mod, None, None, tq, tk, device=device)


def flex_attention_plan(q, k, v, *, block_mask, scale: float) -> torch.Tensor:
    """One compiled FlexAttention call over the plan's block mask (GPU fast path; CPU forward only).

    ``q``/``k``/``v`` are zero-padded to the mask's bucketed lengths; the pad rows are masked
    out and dropped, so the result (and its gradient) is that of the unpadded call.
    """
    tq, tk = block_mask.seq_lengths
    pad = lambda x, n: x if x.size(0) == n else torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n - x.size(0)))  # noqa: E731
    fn = _compiled("flex_attention", _flex_dynamic(q.device))
    out = fn(_heads_first(pad(q, tq)), _heads_first(pad(k, tk)), _heads_first(pad(v, tk)), block_mask=block_mask,
             scale=scale, enable_gqa=q.size(1) != k.size(1))
    return out[0, :, :q.size(0)].permute(1, 0, 2)  # (Tq, H, D)


@functools.cache
def _compiled(name: str, dynamic):
    """``torch.compile`` of a flex_attention function (``dynamic=None``: the first shape compiles
    static, the first change of shape recompiles with dynamic lengths, then no more)."""

    return torch.compile(getattr(fa, name), dynamic=dynamic)


def _flex_dynamic(device) -> bool | None:
    """Automatic dynamic shapes on CUDA; static on CPU, where inductor's C++ code for the flex
    kernel and the mask builder fails to compile symbolic lengths (torch 2.13: "'cur_qSplitSize0'
    was not declared"). Either way the power-of-two buckets bound the number of distinct shapes."""
    return None if torch.device(device).type == "cuda" else False


def causal_attention(q, k, v, *, scale: float) -> torch.Tensor:
    """Plain causal attention for (B, T, H, D) batches (the naive layout), with GQA."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
        enable_gqa=q.size(2) != k.size(2))  # (B, H, T, D)
    return out.transpose(1, 2)  # (B, T, H, D)
