"""Build a tiny Llama/Qwen2/Qwen3-style HF model with random weights, offline.

    python tools/make_tiny_model.py --family qwen2 --tied --out runs/tiny-qwen2
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.models.tiny import FAMILIES, make_tiny_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    ap.add_argument("--out", required=True, help="output directory (written atomically)")
    tie = ap.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", default=None, help="tie embeddings and lm_head")
    tie.add_argument("--untied", dest="tied", action="store_false", help="separate lm_head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--num-hidden-layers", type=int)
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--num-attention-heads", type=int)
    ap.add_argument("--vocab-size", type=int)
    args = ap.parse_args(argv)
    sizes = {k: v for k, v in dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                   intermediate_size=args.intermediate_size,
                                   num_attention_heads=args.num_attention_heads,
                                   vocab_size=args.vocab_size).items() if v is not None}
    path = make_tiny_model(args.out, family=args.family, tied=args.tied, seed=args.seed, **sizes)
    print(f"wrote {args.family} model to {path}")


if __name__ == "__main__":
    main()
