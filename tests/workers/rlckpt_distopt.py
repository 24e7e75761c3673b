"""Worker (torchrun, world 4): RL checkpoint round trip of the megatron-core *distributed* optimizer.

TP2 x DP2 with ``use_distributed_optimizer`` (torch-Adam fallback, ``fully_reshardable`` format):
train 2 steps, save, train 2 more (reference); then a fresh engine (other random init) loads the
checkpoint and trains the same 2 steps. argv: HF model path. Writes losses/grad norms per rank.
"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _launch import write_result  # noqa: E402


def main():
    from transformers import AutoConfig

    from megatron_rl.checkpoint import rl
    from megatron_rl.config import ParallelConfig, TrainConfig
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.train.engine import TrainEngine
    from megatron_rl.train.lm import synthetic_batches

    hf = AutoConfig.from_pretrained(sys.argv[1])
    par = ParallelConfig(tp=2, distributed_optimizer=True, backend="gloo", timeout_s=300)
    init_distributed(par)
    train = TrainConfig(lr=1e-2)
    batches = [synthetic_batches(vocab=hf.vocab_size, num=2, batch=2, seq=16, seed=s) for s in range(4)]
    root = os.path.join(os.environ["OUT_DIR"], "ckpt")

    def run(eng, steps):
        return [(o["loss"], o["grad_norm"]) for o in (eng.step(batches[s]) for s in steps)]

    eng = TrainEngine(hf, parallel=par, train=train)
    first = run(eng, [0, 1])
    rl.save_rl_checkpoint(root, step=1, model=eng.model, optimizer=eng.optimizer, extra={"x": 7}, keep=1)
    ref = run(eng, [2, 3])
    torch.manual_seed(999)  # the fresh engine starts from other weights
    eng2 = TrainEngine(hf, parallel=par, train=train)
    step, extra = rl.load_rl_checkpoint(root, model=eng2.model, optimizer=eng2.optimizer)
    got = run(eng2, [2, 3])
    write_result({"first": first, "ref": ref, "got": got, "step": step, "extra": extra})
    destroy_distributed()


if __name__ == "__main__":
    main()
