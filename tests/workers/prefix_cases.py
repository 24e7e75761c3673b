"""The shared-prefix test batch, shared by the multi-rank worker and the test process.

Three groups with G = 1, 4 and 8, unequal response lengths and one empty response; with
``MAX_TOKENS`` they pack into two micro-batches (the first holds two groups).
"""
import torch

from megatron_rl.attention import Group

# (prompt length, response lengths)
SPECS = [(9, [5]), (23, [3, 7, 0, 4]), (6, [2, 9, 1, 5, 3, 8, 4, 6])]
MAX_TOKENS = 60


def make_groups(*, vocab: int = 250, seed: int = 0, specs=SPECS) -> list:
    """Deterministic random groups; advantages are random per-token weights."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for plen, lens in specs:
        prompt = torch.randint(3, vocab, (plen,), generator=gen).tolist()
        responses = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]
        weights = [torch.randn(n, generator=gen).tolist() for n in lens]
        groups.append(Group(prompt=prompt, responses=responses, advantages=weights))
    return groups


def hf_logprobs(path: str, groups: list) -> dict:
    """``{(g, i): [log p of each response token]}`` from HF transformers, each ``[P, R_i]`` alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for g, group in enumerate(groups):
            for i, resp in enumerate(group.responses):
                ids = torch.tensor([list(group.prompt) + list(resp)])
                logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (S, V)
                plen = len(group.prompt)
                out[(g, i)] = [float(logp[plen - 1 + j, t]) for j, t in enumerate(resp)]
    return out
