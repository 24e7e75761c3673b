"""``megatron-rl plan``: a cluster job checked from one CPU box, with the job's own code.

* :mod:`.shapes`: the model built on ``meta`` for every (tp, pp) rank position;
* :mod:`.memory`: training memory per rank (state, activations, logits);
* :mod:`.rollout`: vLLM's share, weights, KV cache, and what sleep releases;
* :mod:`.sync`: the weight-sync plan at the real world size, on the cluster's links;
* :mod:`.verdict`: fits or not, the term that breaks it and the setting that fixes it;
* :mod:`.command` (the CLI) and :mod:`.table` (its table).
"""
