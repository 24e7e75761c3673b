"""Benchmark: one training step (forward + backward) on naive vs shared-prefix packing.

Same megatron-core GPTModel (Llama-style, 4 layers, hidden 256, 4 heads of 64 with 2 kv
heads, SwiGLU 1024, vocab 4096, fp32, random weights), same GRPO groups, same loss
(advantage-weighted log-probs of the response tokens), one process:

* naive: G rows ``[P, R_i]`` (what users run today), plain causal flash attention;
* shared: one row ``[P, R_1..R_G]``, SharedPrefixCoreAttention (prompt once per layer).

Two bounds on the gain: ``rho = G(P+R) / (P + G*R)`` counts tokens only; ``flop_bound`` counts the
matmul FLOPs of forward and backward, projections, MLP, LM head and attention (:func:`step_flops`):
the attention's quadratic terms make it lower than rho at long responses. Both fractions are
reported; ``"ratio"`` is the speedup of ours over the naive rows (the baseline users run). It also reports the
largest |log p| difference between the two layouts.

    python benchmarks/shared_prefix.py            # headline P=1024 R=64 G=8, then the sweep
    python benchmarks/shared_prefix.py --quick    # < 1 min: headline (2 timed reps) and a short sweep
    python benchmarks/shared_prefix.py --P 8192 --R 512 --G 8 --no-sweep   # any one point

The final line is JSON: {"bench": "shared_prefix", "P", "R", "G", "naive_s", "shared_s",
"speedup", "ratio", "rho", "fraction_of_rho", "flop_bound", "fraction_of_flop_bound",
"max_logprob_abs_diff"}.
"""
import argparse
import json
import os
import socket
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             intermediate_size=1024, vocab_size=4096)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of unmapping it after every step.

    By default big tensors are mmapped and returned to the OS when freed, so each step
    page-faults all its activations again (measured: 0.5-0.8M faults, 1-2 s of system time
    per naive step here, ~0 for the shared step): that would time the allocator, not the
    model. With mmap off and trimming off, steady-state steps reuse their memory, as a
    caching allocator does on GPU. Returns False where mallopt is unavailable.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):
        return False


def _init():
    from transformers import LlamaConfig

    from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix
    from megatron_rl.config import ParallelConfig
    from megatron_rl.models import build_gpt
    from megatron_rl.parallel import init_distributed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    hf = LlamaConfig(**MODEL, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf.architectures = ["LlamaForCausalLM"]
    par = ParallelConfig()
    init_distributed(par, seed=0)
    (model,) = build_gpt(hf, parallel=par, dtype=torch.float32, vocab_divisible_by=128,
                         core_attention=SharedPrefixCoreAttention)
    enable_shared_prefix(model)
    return model.train()


def _groups(p: int, r: int, g: int, seed: int = 0):
    from megatron_rl.attention import Group

    gen = torch.Generator().manual_seed(seed)
    vocab = MODEL["vocab_size"]
    return [Group(prompt=torch.randint(3, vocab, (p,), generator=gen).tolist(),
                  responses=[torch.randint(3, vocab, (r,), generator=gen).tolist() for _ in range(g)],
                  advantages=torch.randn(g, generator=gen).tolist())]


class _Clock:
    """Wall and process-CPU seconds of one step."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> dict:
        return {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


def naive_step(model, groups) -> tuple:
    """fwd+bwd on G rows [P, R_i]; returns ({"wall", "cpu"} seconds, {(g, i): log-probs})."""
    from megatron_rl.attention import pack_naive
    from megatron_rl.train.lm import vocab_parallel_logprobs

    tokens, position_ids, lengths, keys = pack_naive(groups)  # (B, S)
    width = tokens.size(1)
    # log-probs only where a response token is predicted (as RL trainers do), like the shared path
    rows, targets, weights, spans = [], [], [], []
    for b, (g, i) in enumerate(keys):
        plen, resp = len(groups[g].prompt), groups[g].responses[i]
        spans.append((len(rows), len(rows) + len(resp)))
        rows += range(b * width + plen - 1, b * width + lengths[b] - 1)
        targets += resp
        weights += [groups[g].advantages[i]] * len(resp)
    rows, targets, weights = torch.tensor(rows), torch.tensor(targets), torch.tensor(weights)
    model.zero_grad(set_to_none=True)
    clock = _Clock()
    logits = model(tokens, position_ids, attention_mask=None)  # (B, S, V)
    picked = logits.reshape(-1, logits.size(-1)).index_select(0, rows)  # (N, V)
    logp = vocab_parallel_logprobs(picked, targets, vocab_size=MODEL["vocab_size"], tp_rank=0)  # (N,): TP 1
    (-(weights * logp).sum()).backward()
    times = clock.stop()
    return times, {key: logp[a:b].detach() for key, (a, b) in zip(keys, spans)}


def shared_step(model, groups) -> tuple:
    """fwd+bwd on one shared-prefix row; returns ({"wall", "cpu"} seconds, {(g, i): log-probs})."""
    from megatron_rl.attention import make_batches, make_forward_fn

    (batch,) = make_batches(groups, max_tokens=10**7)
    model.zero_grad(set_to_none=True)
    clock = _Clock()
    output, loss_fn = make_forward_fn()(model, batch)
    loss, _, metrics = loss_fn(output)
    loss.backward()
    times = clock.stop()
    parts = torch.split(metrics["logp"], metrics["sizes"])
    return times, dict(zip(map(tuple, metrics["keys"]), parts))


def step_flops(p: int, r: int, g: int, *, shared: bool, shape: dict = None) -> float:
    """Matmul FLOPs of one forward + backward (backward = 2x forward) of the benchmark's model.

    Per token and layer: the q/k/v/o projections and the SwiGLU MLP; per token once: the LM
    head. Attention: 4 * heads * head_dim FLOPs per (query, key) pair it computes (QK^T and AV).
    Naive: G causal rows of P+R tokens. Shared: the prompt once (causal), and each response
    token against the whole prompt and its own earlier tokens."""
    m = shape or MODEL
    h, q = m["hidden_size"], m["num_attention_heads"] * m["head_dim"]
    kv, f, v, n = m["num_key_value_heads"] * m["head_dim"], m["intermediate_size"], m["vocab_size"], m["num_hidden_layers"]
    per_token = n * 2 * (h * q + 2 * h * kv + q * h + 3 * h * f) + 2 * h * v
    if shared:
        tokens, pairs = p + g * r, p * (p + 1) / 2 + g * (r * p + r * (r + 1) / 2)
    else:
        tokens, pairs = g * (p + r), g * (p + r) * (p + r + 1) / 2
    return 3.0 * (tokens * per_token + n * pairs * 4 * q)


def measure(model, p: int, r: int, g: int, *, reps: int, clock: str, warmup: bool = True) -> dict:
    """Best of ``reps`` interleaved naive/shared steps (after a warm-up of each) on ``clock``."""
    groups = _groups(p, r, g)
    if warmup:
        naive_step(model, groups)
        shared_step(model, groups)
    naive_t, shared_t, diff = [], [], 0.0
    for _ in range(reps):
        tn, ln = naive_step(model, groups)
        ts, ls = shared_step(model, groups)
        naive_t.append(tn)
        shared_t.append(ts)
        diff = max(diff, max(float((ls[k] - ln[k]).abs().max()) for k in ln))
    best = lambda ts, c: min(t[c] for t in ts)  # noqa: E731  (min: the least-disturbed run)
    naive_s, shared_s = best(naive_t, clock), best(shared_t, clock)
    rho = g * (p + r) / (p + g * r)
    flop_bound = step_flops(p, r, g, shared=False) / step_flops(p, r, g, shared=True)
    return {"P": p, "R": r, "G": g, "naive_s": round(naive_s, 4), "shared_s": round(shared_s, 4),
            "speedup": round(naive_s / shared_s, 3), "ratio": round(naive_s / shared_s, 3), "rho": round(rho, 3),
            "fraction_of_rho": round(naive_s / shared_s / rho, 3), "flop_bound": round(flop_bound, 3),
            "fraction_of_flop_bound": round(naive_s / shared_s / flop_bound, 3), "max_logprob_abs_diff": diff,
            "wall": (best(naive_t, "wall"), best(shared_t, "wall"))}


def _line(m: dict) -> str:
    return (f"P={m['P']:5d} R={m['R']:3d} G={m['G']}  naive {m['naive_s']*1e3:8.1f} ms  shared "
            f"{m['shared_s']*1e3:7.1f} ms  speedup {m['speedup']:5.2f}x  rho {m['rho']:5.2f}  "
            f"fraction {m['fraction_of_rho']:.2f}  flop bound {m['flop_bound']:5.2f} "
            f"(fraction {m['fraction_of_flop_bound']:.2f})  max|dlogp| {m['max_logprob_abs_diff']:.1e}  "
            f"(wall: naive {m['wall'][0]*1e3:.0f} ms, shared {m['wall'][1]*1e3:.0f} ms)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="finish within a minute (fewer reps, short sweep)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per point (default 3; quick: 2 for the headline, 1 per sweep point)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (robust on a shared machine; exact with --threads 1); wall")
    ap.add_argument("--P", type=int, default=1024, help="prompt tokens of the headline point (default 1024)")
    ap.add_argument("--R", type=int, default=64, help="response tokens of the headline point (default 64)")
    ap.add_argument("--G", type=int, default=8, help="responses per prompt of the headline point (default 8)")
    ap.add_argument("--no-sweep", action="store_true", help="measure the headline point only")
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    model = _init()
    print(f"model: megatron-core GPTModel {MODEL}, fp32, {torch.get_num_threads()} thread(s), clock={args.clock}, "
          f"best of {reps}, freed memory kept in process: {kept}; naive = G rows [P,R_i], causal flash attention")
    head = measure(model, args.P, args.R, args.G, reps=reps, clock=args.clock)
    # quick: the sweep points run after the headline's warm-up, once each, without their own
    point = lambda p, g: measure(model, p, 64, g, reps=1 if args.quick else reps, clock=args.clock,  # noqa: E731
                                 warmup=not args.quick)
    print("headline: " + _line(head))
    sweep = [(p, g) for p in (256, 1024, 2048) for g in (4, 8)]
    if args.no_sweep:
        sweep = []
    elif args.quick:
        sweep = [(256, 4), (256, 8)]
        print("sweep (quick: P=1024 G=4 and P=2048 skipped; run without --quick for the full sweep):")
    else:
        print("sweep:")
    for p, g in sweep:
        print("  " + _line(head if (p, g, 64) == (args.P, args.G, args.R) else point(p, g)))
    from megatron_rl.parallel import destroy_distributed

    destroy_distributed()
    head.pop("wall")
    print(json.dumps({"bench": "shared_prefix", **head}))


if __name__ == "__main__":
    main()
