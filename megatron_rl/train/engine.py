"""A small megatron-core training engine: DDP-wrapped chunks, megatron optimizer, schedules.

The forward step is pluggable: ``forward_fn(model, batch) -> (output_tensor, loss_fn)`` where
``loss_fn(output_tensor) -> (loss_sum, normaliser, metrics)`` (megatron's per-token-loss
convention: ``loss_sum`` is a scalar to *sum*, ``normaliser`` an int tensor; the engine divides
every gradient by the normaliser summed over all micro-batches, DP and CP ranks). The default
is :func:`megatron_rl.train.lm.lm_forward` (next-token LM loss); shared-prefix packing and
the GRPO loss plug in their own.

Usage (after :func:`megatron_rl.parallel.init_distributed`)::

    topo = init_distributed(cfg.parallel)
    eng = TrainEngine(hf_config, parallel=cfg.parallel, train=cfg.train, topo=topo, hf_path=path)
    out = eng.step(micro_batches)          # {"loss": ..., "grad_norm": ..., "tokens": ...}
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_rl.models import build_gpt
from megatron_rl.checkpoint.megatron import load_hf_into
from megatron_rl.parallel import collectives as coll
from megatron_rl.train.lm import lm_forward
from megatron_rl.train.routing import RouteControl


ForwardFn = Callable[[torch.nn.Module, dict], tuple]


class TrainEngine:
    """Model chunks (megatron DDP), optimizer and one ``step()`` over micro-batches."""

    def __init__(self, hf_config, *, parallel, train, topo, dtype=torch.float32, hf_path: Optional[str] = None,
                 forward_fn: ForwardFn = lm_forward, core_attention=None, vocab_divisible_by: int = 128,
                 value_head: bool = False, routes: str = "off"):
        # lazy: keeps vLLM/megatron out of CLI start-up
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        # lazy: keeps vLLM/megatron out of CLI start-up
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.hf_config, self.parallel, self.forward_fn, self.topo = hf_config, parallel, forward_fn, topo
        if routes not in ("off", "count", "replay"):
            raise ValueError(f"routes={routes!r}; use 'off', 'count' (route-mismatch metric) or 'replay'")
        chunks = build_gpt(hf_config, parallel=parallel, topo=topo, dtype=dtype, vocab_divisible_by=vocab_divisible_by,
                           core_attention=core_attention, recompute=train.recompute, value_head=value_head,
                           routing_replay=routes != "off")
        # routes != "off": the routers replay (or only count against) the micro-batches' routes
        self.routing = None if routes == "off" else RouteControl.install(chunks, replay=routes == "replay")
        if hf_path is not None:  # a critic's value head (value_head=True) has no HF counterpart: it stays zero
            load_hf_into(chunks, hf_path, topo=topo, hf_config=hf_config, vocab_divisible_by=vocab_divisible_by,
                         skip=("output_layer.",) if value_head else ())
        self.tf_config = tf = chunks[0].config
        tf.calculate_per_token_loss = True  # loss_fn returns sums; finalize_model_grads divides
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=parallel.distributed_optimizer, check_for_nan_in_grad=False)
        self.model = [DistributedDataParallel(config=tf, ddp_config=ddp_config, module=c) for c in chunks]
        opt_config = OptimizerConfig(
            optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
            clip_grad=train.grad_clip,
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
            use_distributed_optimizer=parallel.distributed_optimizer)
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        tf.finalize_model_grads_func = finalize_model_grads
        tf.no_sync_func = self.model[0].no_sync if len(self.model) == 1 else [m.no_sync for m in self.model]

    # -- running micro-batches --------------------------------------------------------------------

    def _run(self, batches: list, *, forward_fn: Optional[ForwardFn], forward_only: bool) -> list:
        return run_schedule(self.model, batches, forward_fn=forward_fn or self.forward_fn, forward_only=forward_only)

    def step(self, batches: list, *, forward_fn: Optional[ForwardFn] = None) -> dict:
        """One optimizer step over this DP rank's micro-batches. Same result on every rank.

        Returns ``loss`` (sum of loss_sums / sum of normalisers over the global batch),
        ``grad_norm`` (before clipping), ``tokens`` (global normaliser) and ``updated``.
        """
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(batches, forward_fn=forward_fn, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        loss_sum, tokens = reduce_loss(outputs, topo=self.topo)
        return {"loss": loss_sum / max(tokens, 1), "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens": tokens, "updated": bool(updated)}

    @torch.no_grad()
    def forward(self, batches: list, *, forward_fn: Optional[ForwardFn] = None) -> list:
        """Forward only. Returns the per-micro-batch ``metrics`` dicts (last PP stage; [] elsewhere)."""
        for m in self.model:
            m.eval()
        return self._run(batches, forward_fn=forward_fn, forward_only=True)


def run_schedule(chunks: list, batches: list, *, forward_fn: ForwardFn, forward_only: bool) -> list:
    """Megatron's pipeline schedule over ``batches`` with ``forward_fn``; returns the last stage's
    per-micro-batch metrics. Shared by the engine and the frozen reference model."""
    # lazy: keeps vLLM/megatron out of CLI start-up
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = batches[0]["tokens"]  # (B, S): full sequences; forward_fn splits for CP

    def step_fn(data_iterator, model):
        return forward_fn(model, next(data_iterator))

    return get_forward_backward_func()(
        forward_step_func=step_fn, data_iterator=iter(batches), model=chunks,
        num_microbatches=len(batches), seq_length=tokens.size(1), micro_batch_size=tokens.size(0),
        forward_only=forward_only)


def reduce_loss(outputs: list, *, topo) -> tuple[float, int]:
    """Global (loss_sum, normaliser) from the last stage's metrics, on every rank.

    Each metrics dict carries ``loss_sum`` and ``tokens``; they are summed over micro-batches,
    all-reduced over DP x CP, then broadcast from the last PP stage (``topo``: the
    :class:`~megatron_rl.parallel.Topology`).
    """
    loss_sum = sum(float(m["loss_sum"]) for m in outputs)
    tokens = sum(float(m["tokens"]) for m in outputs)
    dp = topo.dp_cp_group
    acc = coll.tensor([loss_sum, tokens], dtype=torch.float64, group=dp)  # the group's device (NCCL: CUDA)
    if topo.is_last_stage:
        coll.all_reduce(acc, group=dp)
    if topo.grid.pp > 1:
        coll.broadcast(acc, src=topo.pp_last_rank, group=topo.pp_group)
    loss_sum, tokens = acc.tolist()
    return loss_sum, int(tokens)
