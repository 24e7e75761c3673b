"""Compare two HF checkpoints: per-tensor bitwise equality, max weight difference, and logits.

Used by ``launch/demo.sh`` to report a round trip. Prints human lines, then one JSON line.

    python -m megatron_rl.checkpoint.compare runs/demo/hf runs/demo/hf-roundtrip
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from megatron_rl.checkpoint import CheckpointError
from megatron_rl.checkpoint.hf import open_hf


def compare(a_dir: str, b_dir: str, *, tokens: torch.Tensor) -> dict:
    """Figures for ``b`` against ``a`` (same architecture and shapes required)."""

    a, b = open_hf(a_dir), open_hf(b_dir)
    if a.shape != b.shape:
        raise CheckpointError(f"{b_dir}: model shape {b.shape} differs from {a_dir}'s {a.shape}; "
                              "fix: compare checkpoints of the same model")
    names = list(a.shape.canonical_shapes())
    unequal, max_diff = [], 0.0
    for n in names:
        ta, tb = a.tensor(n), b.tensor(n)
        if ta.dtype != tb.dtype or not torch.equal(ta, tb):
            unequal.append(n)
            max_diff = max(max_diff, (ta.float() - tb.float()).abs().max().item())
    logits = []
    for path in (a_dir, b_dir):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(tokens).logits)  # (B, S, vocab)
    return {"tensors": len(names), "bitwise_equal": len(names) - len(unequal), "max_abs_weight_diff": max_diff,
            "max_abs_logit_diff": (logits[0] - logits[1]).abs().max().item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_rl.checkpoint.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="reference HF directory")
    ap.add_argument("b", help="HF directory to compare with it")
    ap.add_argument("--name", default="compare", help="label of the JSON line")
    args = ap.parse_args(argv)
    tokens = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    try:
        r = compare(args.a, args.b, tokens=tokens)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.name}: {r['bitwise_equal']}/{r['tensors']} tensors bitwise equal, "
          f"max |dw| {r['max_abs_weight_diff']:.3g}, max |dlogits| {r['max_abs_logit_diff']:.3g}")
    print(json.dumps({"check": args.name, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
