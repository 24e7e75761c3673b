"""HF <-> Megatron checkpoint conversion and offline reshard (same as ``megatron-rl convert``).

    python tools/convert_checkpoint.py hf-to-megatron --src runs/tiny-llama --out runs/llama-tp2pp2 --tp 2 --pp 2
    python tools/convert_checkpoint.py megatron-to-hf --src runs/llama-tp2pp2 --out runs/llama-hf
    python tools/convert_checkpoint.py reshard --src runs/llama-tp2pp2 --out runs/llama-tp1pp1 --tp 1 --pp 1
    python tools/convert_checkpoint.py --help
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.checkpoint.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
