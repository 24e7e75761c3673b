"""Attention kernels for an ``AttentionPlan``: a blocked CPU path, a FlexAttention path, a reference.

* :func:`task_attention` (CPU, and any device with a flash kernel that returns its
  log-sum-exp): runs every plan task ``(q0, q1, k0, k1, causal)`` with the fused flash
  kernel, merges tasks that share query rows by log-sum-exp, and in backward runs the
  flash backward of every task against the *merged* output and log-sum-exp (the same
  identity ring attention uses), summing dQ/dK/dV. Nothing quadratic in the packed length
  is materialised; a response block attends to ``[prompt]`` (dense) and ``[itself]``
  (causal) as two tasks.
* :func:`flex_attention_plan` (CUDA): one FlexAttention call whose block mask is built from
  the plan's per-token metadata; fully masked 128x128 blocks are skipped by the kernel.
* :func:`reference_attention`: dense masked softmax from the same metadata, for tests only.

All take ``q (Tq, H, D)``, ``k/v (Tk, Hk, D)`` with ``H % Hk == 0`` (GQA) and return
``(Tq, H, D)``.
"""
from __future__ import annotations

import functools

import torch

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


def flex_block_mask(q_meta: dict, k_meta: dict, *, device):
    """A FlexAttention ``BlockMask`` for the plan (build once per micro-batch, reuse per layer)."""
    from torch.nn.attention.flex_attention import create_block_mask

    qm = {n: t.to(device) for n, t in q_meta.items()}
    km = {n: t.to(device) for n, t in k_meta.items()}

    def mask_mod(b, h, qi, ki):
        return allowed(qm, km, qi, ki)

    return create_block_mask(mask_mod, None, None, len(qm["pos"]), len(km["pos"]), device=device)


def flex_attention_plan(q, k, v, *, block_mask, scale: float) -> torch.Tensor:
    """One FlexAttention call over the plan's block mask (GPU fast path)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:
        fn = _compiled_flex()
    out = fn(_heads_first(q), _heads_first(k), _heads_first(v), block_mask=block_mask, scale=scale,
             enable_gqa=q.size(1) != k.size(1))
    return out[0].permute(1, 0, 2)  # (Tq, H, D)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def causal_attention(q, k, v, *, scale: float) -> torch.Tensor:
    """Plain causal attention for (B, T, H, D) batches (the naive layout), with GQA."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
        enable_gqa=q.size(2) != k.size(2))  # (B, H, T, D)
    return out.transpose(1, 2)  # (B, T, H, D)
