"""Rollout engines behind a narrow protocol (base.RolloutEngine); vLLM in SPMD mode (vllm_engine).

Usage::

    from megatron_rl.rollout.vllm_engine import VllmEngine
    from megatron_rl.rollout.base import Sampling
"""
