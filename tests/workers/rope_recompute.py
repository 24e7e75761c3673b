"""Worker for tests/test_rope_recompute.py (torchrun, world 4: megatron TP2 x PP2, vLLM TP1 x 4 replicas).

One launch checks, for a tiny Llama with ``rope_type: llama3`` (argv[1]) and the same weights with
plain RoPE (argv[2], the negative control):

* ``logits``: megatron's full-vocab logits (TP shards gathered on the last PP stage) against HF
  transformers' logits of the llama3 model, for both models;
* ``recompute``: one optimizer step with ``train.recompute`` none / full / selective from the same
  weights: loss, grad norm, and this rank's peak bytes of tensors saved for backward (activations;
  parameters excluded), counted by autograd saved-tensor hooks over forward and backward;
* ``mismatch``: vLLM samples (temperature 1, fp32) from the llama3 model and their vLLM log-probs,
  against megatron's log-probs of the same tokens (shared-prefix packed, as the trainer computes them),
  for both megatron models.

Every rank writes its JSON; logits figures only on the last PP stage.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _launch import write_result  # noqa: E402
from grpo_step import G, N, own_logprobs  # noqa: E402

from megatron_rl.config import ParallelConfig, TrainConfig  # noqa: E402
from megatron_rl.train.engine import TrainEngine  # noqa: E402

PAR = ParallelConfig(tp=2, pp=2)
TOPO: list = []  # the Topology main() builds for PAR (rollout tp 1)
B, S = 2, 64  # logits check; positions reach beyond the llama3 model's original_max_position_embeddings


def megatron_logits(eng, tokens: torch.Tensor):
    """Full-vocab logits (B, S, vocab) on the last PP stage, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    vocab = eng.hf_config.vocab_size

    def forward_fn(model, batch):
        pos = torch.arange(batch["tokens"].size(1)).unsqueeze(0).expand_as(batch["tokens"])
        out = model(batch["tokens"], pos, attention_mask=None)

        def loss_fn(logits):
            full = gather_from_tensor_model_parallel_region(logits)[..., :vocab]
            return logits.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": full.detach().clone()}

        return out, loss_fn

    metrics = eng.forward([{"tokens": tokens}], forward_fn=forward_fn)
    return metrics[0]["logits"] if ps.is_pipeline_last_stage() else None


def logits_checks(paths: dict) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokens = torch.randint(3, 250, (B, S), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(paths["llama3"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(tokens).logits
    out = {}
    for name, path in paths.items():
        eng = TrainEngine(AutoConfig.from_pretrained(path), parallel=PAR, train=TrainConfig(), topo=TOPO[0],
                          hf_path=path)
        got = megatron_logits(eng, tokens)
        if got is not None:
            out[name] = float((got - want).abs().max())
        del eng
    out["hf_logit_scale"] = float(want.abs().max())
    return out


class SavedBytes:
    """Peak bytes of live tensors autograd saved for backward (storage-deduplicated, parameters skipped)."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.live, self.now, self.peak = {}, 0, 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.skip:
            return t
        n = self.live.setdefault(ptr, [t.untyped_storage().nbytes(), 0])
        if n[1] == 0:
            self.now += n[0]
            self.peak = max(self.peak, self.now)
        n[1] += 1
        return _Held(self, t, ptr)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held

    def release(self, ptr):
        n = self.live[ptr]
        n[1] -= 1
        if n[1] == 0:
            self.now -= n[0]
            del self.live[ptr]


class _Held:
    def __init__(self, owner, t, ptr):
        self.owner, self.t, self.ptr = owner, t, ptr

    def __del__(self):
        self.owner.release(self.ptr)


def recompute_checks(path: str) -> dict:
    from transformers import AutoConfig

    from megatron_rl.train.lm import synthetic_batches

    hf_config = AutoConfig.from_pretrained(path)
    batches = synthetic_batches(vocab=hf_config.vocab_size, num=2, batch=2, seq=128, seed=7)
    out = {}
    for mode in ("none", "full", "selective"):
        eng = TrainEngine(hf_config, parallel=PAR, topo=TOPO[0],
                          train=TrainConfig(lr=1e-3, grad_clip=1e9, recompute=mode),
                          hf_path=path)
        counter = SavedBytes([p for m in eng.model for p in m.parameters()] +
                             [b for m in eng.model for b in m.module.buffers()])
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            res = eng.step(batches)
        out[mode] = {"loss": res["loss"], "grad_norm": res["grad_norm"], "peak_saved_mib": counter.peak / 2 ** 20,
                     "granularity": eng.tf_config.recompute_granularity}
        del eng
    return out


def mismatch_checks(paths: dict) -> dict:
    """vLLM (llama3 model) log-probs of its own samples vs megatron's, for both megatron models."""
    from transformers import AutoConfig

    from megatron_rl.algorithms.grpo import RolloutBatch
    from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix
    from megatron_rl.config import RolloutConfig
    from megatron_rl.rollout.base import Sampling
    from megatron_rl.rollout.vllm_engine import VllmEngine

    cfg = RolloutConfig(tp=1, kv_cache_bytes=32 << 20, max_model_len=128, seed=0)
    vllm = VllmEngine(paths["llama3"], cfg=cfg, topo=TOPO[0], run_dir=os.path.join(os.environ["OUT_DIR"], "vllm"))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 90, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N)]
    gens = vllm.generate([p for p in prompts for _ in range(G)],
                         sampling=Sampling(temperature=1.0, max_new_tokens=24, seed=5))
    resp = [[gens[i * G + j].tokens for j in range(G)] for i in range(N)]
    roll = [[gens[i * G + j].logprobs for j in range(G)] for i in range(N)]
    batch = RolloutBatch(rows=[], prompt_ids=prompts, response_ids=resp, logprobs=roll)
    out = {"response_tokens": sum(len(r) for rs in resp for r in rs)}
    for name, path in paths.items():
        eng = TrainEngine(AutoConfig.from_pretrained(path), parallel=PAR, train=TrainConfig(), topo=TOPO[0],
                          hf_path=path,
                          core_attention=SharedPrefixCoreAttention)
        enable_shared_prefix(eng.model)
        mine = own_logprobs(eng, batch, torch.zeros(N * G))
        out[name] = max(abs(a - b) for gm, gr in zip(mine, roll) for xm, xr in zip(gm, gr) for a, b in zip(xm, xr))
        del eng
    return out


def main():
    from transformers import AutoConfig

    from megatron_rl.parallel import init_distributed

    paths = {"llama3": sys.argv[1], "plain": sys.argv[2]}
    TOPO.append(init_distributed(PAR))
    res, seconds = {"rank": dist.get_rank()}, {}
    for name, check in (("logits", lambda: logits_checks(paths)), ("recompute", lambda: recompute_checks(
            paths["llama3"])), ("mismatch", lambda: mismatch_checks(paths))):
        t0 = time.perf_counter()
        res[name] = check()
        seconds[name] = time.perf_counter() - t0
    res["seconds"] = seconds
    write_result(res)
    dist.barrier()  # vLLM tears down its groups at exit; the default group must still exist


if __name__ == "__main__":
    main()
