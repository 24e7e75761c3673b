"""RL checkpoint round trip of the megatron-core *distributed* optimizer (world 4).

TP2 x DP2 with ``use_distributed_optimizer`` (torch-Adam fallback, ``fully_reshardable`` format):
train 2 steps, save, train 2 more (reference); then a fresh engine (other random init) loads the
checkpoint and trains the same 2 steps. :func:`round_trip` runs inside the conversion launch
(tests/workers/ckpt_matrix.py); standalone, argv is the HF model path::

    torchrun --nproc-per-node 4 tests/workers/rlckpt_distopt.py runs/.test-models/llama
"""
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _launch import write_result  # noqa: E402


def round_trip(hf_path: str, root: str) -> dict:
    """Losses/grad norms before and after the resume on this rank, or the error (collective)."""
    from transformers import AutoConfig

    from megatron_rl.checkpoint import rl
    from megatron_rl.config import ParallelConfig, TrainConfig
    from megatron_rl.parallel import destroy_distributed, init_distributed
    from megatron_rl.train.engine import TrainEngine
    from megatron_rl.train.lm import synthetic_batches

    hf = AutoConfig.from_pretrained(hf_path)
    par = ParallelConfig(tp=2, distributed_optimizer=True, backend="gloo", timeout_s=300)
    topo = init_distributed(par)
    try:
        train = TrainConfig(lr=1e-2)
        batches = [synthetic_batches(vocab=hf.vocab_size, num=2, batch=2, seq=16, seed=s) for s in range(4)]

        def run(eng, steps):
            return [(o["loss"], o["grad_norm"]) for o in (eng.step(batches[s]) for s in steps)]

        eng = TrainEngine(hf, parallel=par, train=train, topo=topo)
        first = run(eng, [0, 1])
        rl.save_rl_checkpoint(root, step=1, model=eng.model, optimizer=eng.optimizer, extra={"x": 7}, keep=1)
        ref = run(eng, [2, 3])
        torch.manual_seed(999)  # the fresh engine starts from other weights
        eng2 = TrainEngine(hf, parallel=par, train=train, topo=topo)
        step, extra = rl.load_rl_checkpoint(root, model=eng2.model, optimizer=eng2.optimizer)
        got = run(eng2, [2, 3])
        return {"first": first, "ref": ref, "got": got, "step": step, "extra": extra}
    except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
        return {"error": traceback.format_exc()}
    finally:
        destroy_distributed(keep_process_group=True)


def main():
    dist.init_process_group("gloo")
    write_result(round_trip(sys.argv[1], os.path.join(os.environ["OUT_DIR"], "ckpt")))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
