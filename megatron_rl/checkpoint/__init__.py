"""Checkpoints: HF safetensors and megatron-core dist-checkpoints, moved through the layout algebra.

- :mod:`.hf` is the one HF reader (by slices, never a whole tensor it does not need) and the
  safetensors writer; :mod:`.publish` makes every output atomic (temporary sibling, fsync, rename).
- :mod:`.megatron` saves and loads megatron-core ``dist_checkpointing`` (torch_dist) checkpoints
  of models built by :mod:`megatron_rl.models`, with a small metadata file beside them, and
  fills a model's shard from HF (:func:`~.megatron.load_hf_into`).
- :mod:`.convert` is the ``megatron-rl convert`` tool and :mod:`.spmd` its per-rank part:
  HF -> Megatron at any TP/PP, Megatron -> HF (an RL checkpoint's policy too: ``rl-to-hf``, located
  by :func:`.rl.policy_source`), and Megatron(TP a, PP b) -> Megatron(TP c, PP d),
  all through canonical (HF-named) regions of :mod:`megatron_rl.resharding.layout`; the last two
  are plans run by the live sync's executor (:mod:`megatron_rl.resharding.executor`).

Every bad input raises :class:`CheckpointError` with one line naming the file or field and the fix.
"""


class CheckpointError(ValueError):
    """A checkpoint or conversion request that cannot work. One line: what, where, and the fix."""
