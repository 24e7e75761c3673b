"""Build a tiny Llama/Qwen2/Qwen3-style HF model with random weights, offline.

    python tools/make_tiny_model.py --family qwen2 --tied --out runs/tiny-qwen2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rl.models.tiny import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
