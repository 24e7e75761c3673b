"""The critic's scalar value head, in place of a GPTModel's vocabulary projection.

PPO's value model is the policy's megatron-core ``GPTModel`` (same layers, same HF weights)
whose ``output_layer`` (hidden -> vocab / TP, column-parallel) is replaced on the last pipeline
stage by :class:`ValueHead`: hidden -> 1, a weight ``(1, H)`` and bias ``(1,)`` replicated on
every TP rank (one output cannot be split over TP). GPTModel calls it exactly as its output
layer, ``head(hidden (S, B, H)) -> ((S, B, 1), None)``, and returns ``(B, S, 1)``.

* Under sequence parallelism the decoder's output is split along S over TP; the head gathers
  it first. The backward of that gather is a *split*, not a reduce-scatter: every TP rank
  computes the same value and the same loss, so each already holds the full gradient.
* The parameters are TP duplicates (no ``tensor_model_parallel`` attribute): megatron's grad
  norm counts them once, and no TP all-reduce touches their gradients (each rank's is whole).
* It starts at zero (weight and bias), identically at every layout: the first values are 0.
* Megatron's dist checkpointing saves it as replicated tensors (its default for a plain module).

Usage::

    chunks = build_gpt(hf_config, parallel=par, topo=topo, value_head=True)   # megatron_rl.models
    values = chunks[0](tokens, position_ids, attention_mask=None)[0, :, 0]     # (S,) on the last stage
"""
from __future__ import annotations

import torch


class ValueHead(torch.nn.Module):
    """``hidden (S, B, H) -> ((S, B, 1), None)``; see the module docstring."""

    def __init__(self, config, *, tp_group):
        super().__init__()
        self.config, self.tp_group = config, tp_group
        self.sequence_parallel = config.sequence_parallel  # GPTModel reads this attribute of its output layer
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size, dtype=dtype))  # (1, H)
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))  # (1,)

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        # lazy: keeps vLLM/megatron out of CLI start-up
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(  # (S/TP, B, H) -> (S, B, H)
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group)
        w, b = self.weight.to(hidden_states.dtype), self.bias.to(hidden_states.dtype)
        return torch.nn.functional.linear(hidden_states, w, b), None  # (S, B, 1)


def install_value_head(model, *, tp_group) -> None:
    """Replace ``model.output_layer`` (a GPTModel on its last stage) by a zero :class:`ValueHead`."""
    head = ValueHead(model.config, tp_group=tp_group)
    device = next(model.parameters()).device
    model.output_layer = head.to(device)
