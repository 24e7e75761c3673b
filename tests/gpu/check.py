"""The prepared check for one real GPU (``bash tests/gpu/run.sh``): no vLLM, only torch and
megatron-core. It prints one JSON line with three parts:

1. ``lm_train``: ``megatron-rl lm-train`` for 2 steps under torchrun at world 1, on NCCL, bf16
   (the reducers, the optimizer and the collectives helpers on a real device).
2. ``shared_prefix``: the GRPO loss path on a random ~0.5B Llama (bf16) at P=4096, R=256, G=8:
   shared-prefix FlexAttention against the naive [P, R_i] rows, forward and backward: the
   largest log-prob difference, the speedup, and how often FlexAttention compiled over 10
   steps of changing response lengths.
3. ``memory``: bytes the driver gets back from ``return_cached_blocks`` (torch's cache emptied
   before vLLM wakes) and from offloading the frozen KL reference model.
4. ``moe``: the tiny Qwen3-MoE (8 experts, top-2) through megatron-core's MoE layer on the device
   (TE's grouped GEMM where Transformer Engine is installed, else the local experts; the router's
   GEMM through compat patch 11 without TE), fp32: the largest logit difference from HF
   transformers' Qwen3MoeForCausalLM on the same tokens, and 2 optimizer steps (loss, grad norm).

``--smoke`` runs the same code on CPU at toy sizes (gloo, fp32): tests/test_gpu_check.py runs
it in CI, so the script cannot rot while no GPU is at hand.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

# ~0.5B parameters (Qwen2.5-0.5B's widths with a Llama block), random weights.
BIG = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
           intermediate_size=4864, vocab_size=32000)
TOY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
           intermediate_size=256, vocab_size=1024)


def lm_train(work: str, smoke: bool) -> dict:
    from megatron_rl.models.tiny import make_tiny_model

    path = os.path.join(work, "tiny-llama")
    make_tiny_model(path, family="llama", seed=0)
    dtype, backend = ("float32", "gloo") if smoke else ("bfloat16", "nccl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", "29533", "-m", "megatron_rl.cli", "lm-train", "--config",
           os.path.join(REPO, "configs", "tiny_cpu.yaml"), f"model.hf_path={path}", f"model.dtype={dtype}",
           "parallel.world_size=1", "parallel.tp=1", "parallel.pp=1", f"parallel.backend={backend}", "train.steps=2"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    summary = next((json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"job": "lm-train"')), None)
    out = {"rc": p.returncode, "seconds": round(time.time() - t0, 1), "backend": backend, "dtype": dtype}
    if summary is None:
        out["tail"] = (p.stdout + p.stderr)[-2000:]
    else:
        out.update(loss=summary["loss"], grad_norm=summary["grad_norm"])
    return out


TOPO: list = []  # the Topology _model built (memory() reuses its single-rank groups)


def _model(shape: dict, device: torch.device, dtype):
    from transformers import LlamaConfig

    from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix
    from megatron_rl.config import ParallelConfig
    from megatron_rl.models import build_gpt
    from megatron_rl.parallel import init_distributed

    hf = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf.architectures = ["LlamaForCausalLM"]
    par = ParallelConfig(backend="gloo" if device.type == "cpu" else "nccl")
    TOPO[:] = [init_distributed(par, seed=0)]
    (model,) = build_gpt(hf, parallel=par, topo=TOPO[0], dtype=dtype, vocab_divisible_by=128,
                         core_attention=SharedPrefixCoreAttention)
    enable_shared_prefix(model)
    return model.to(device).train(), hf


def shared_prefix(smoke: bool) -> dict:
    import shared_prefix as bench  # benchmarks/shared_prefix.py: the same naive and shared steps
    from torch._dynamo.utils import counters

    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = TOY if smoke else BIG
    P, R, G = (64, 16, 4) if smoke else (4096, 256, 8)
    bench.MODEL = shape  # its groups draw tokens from this vocabulary
    model, _ = _model(shape, device, dtype)
    groups = bench._groups(P, R, G)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bench.naive_step(model, groups), bench.shared_step(model, groups)  # warm-up (and compile)
    sync()
    t0 = time.perf_counter()
    _, naive = bench.naive_step(model, groups)
    sync()
    t1 = time.perf_counter()
    _, shared = bench.shared_step(model, groups)
    sync()
    t2 = time.perf_counter()
    diff = max(float((shared[k].float() - naive[k].float()).abs().max()) for k in naive)
    before = counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):  # changing response lengths, as every RL step has
        lens = torch.randint(R // 2, R + 1, (G,), generator=gen).tolist()
        g = bench._groups(P, R, G)[0]
        g = dataclasses.replace(g, responses=[r[:n] for r, n in zip(g.responses, lens)])
        bench.shared_step(model, [g])
    sync()
    return {"P": P, "R": R, "G": G, "dtype": str(dtype), "max_logprob_abs_diff": diff,
            "naive_s": round(t1 - t0, 4), "shared_s": round(t2 - t1, 4), "speedup": round((t1 - t0) / (t2 - t1), 3),
            "compiles_over_10_steps": counters["stats"]["unique_graphs"] - before,
            "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None}


def memory(work: str, smoke: bool) -> dict:
    """The driver's free memory around the two hand-backs (on CPU: RSS around the reference offload)."""
    from megatron_rl.trainer import return_cached_blocks

    out = {}
    if not smoke:
        x = torch.ones(8 << 30, dtype=torch.uint8, device="cuda")  # 8 GiB, cached after del
        del x
        free0 = torch.cuda.mem_get_info()[0]
        return_cached_blocks()
        out["empty_cache_returned"] = torch.cuda.mem_get_info()[0] - free0
    from transformers import AutoConfig

    from megatron_rl.config import ParallelConfig
    from megatron_rl.models.tiny import make_tiny_model
    from megatron_rl.train.reference import ReferenceModel

    path = os.path.join(work, "ref-model")
    make_tiny_model(path, family="llama", seed=0)
    dtype = torch.float32 if smoke else torch.bfloat16
    ref = ReferenceModel(AutoConfig.from_pretrained(path), parallel=ParallelConfig(), topo=TOPO[0], hf_path=path,
                         store_dir=os.path.join(work, "ref-store"), dtype=dtype)
    if smoke:
        import psutil

        ref.onload()
        rss_on = psutil.Process().memory_info().rss
        ref.offload()
        out["reference_offload_rss_drop"] = rss_on - psutil.Process().memory_info().rss
    else:
        ref.onload()
        torch.cuda.synchronize()
        used_on = torch.cuda.memory_allocated()
        ref.offload()
        return_cached_blocks()
        out["reference_offload_returned"] = used_on - torch.cuda.memory_allocated()
    out["reference_bytes"] = ref.param_bytes
    return out


def moe(work: str, smoke: bool) -> dict:
    """Part 4 (docstring above). World 1 on the topology part 2 built; fp32 on both sides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_rl.config import ParallelConfig, TrainConfig
    from megatron_rl.models import te_available
    from megatron_rl.models.tiny import make_tiny_model
    from megatron_rl.train.engine import TrainEngine

    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    path = os.path.join(work, "tiny-moe")
    make_tiny_model(path, family="qwen3_moe", seed=0)
    tokens = torch.randint(3, 250, (2, 32), generator=torch.Generator().manual_seed(0))
    make_tiny_model(path + "-control", family="qwen3_moe", seed=1)  # negative control: other weights
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits
        other = AutoModelForCausalLM.from_pretrained(path + "-control", dtype=torch.float32).eval()(tokens).logits
    par = ParallelConfig(backend="gloo" if smoke else "nccl")
    eng = TrainEngine(AutoConfig.from_pretrained(path), parallel=par, train=TrainConfig(lr=1e-3), topo=TOPO[0],
                      hf_path=path)
    vocab = want.size(-1)

    def forward_fn(model, batch):
        t = batch["tokens"]
        out = model(t, torch.arange(t.size(1), device=t.device).expand_as(t), attention_mask=None)
        return out, lambda logits: (logits.sum() * 0, torch.tensor(1, dtype=torch.int),
                                    {"logits": logits[..., :vocab].detach().float().cpu()})

    got = eng.forward([{"tokens": tokens.to(device)}], forward_fn=forward_fn)[0]["logits"]
    from megatron_rl.train.lm import synthetic_batches

    batches = [{k: v.to(device) for k, v in b.items()} for b in synthetic_batches(vocab=vocab, num=2, batch=2,
                                                                                   seq=16, seed=7)]
    steps = [eng.step(batches) for _ in range(2)]
    return {"te": te_available(), "max_logit_abs_diff": float((got - want).abs().max()),
            "control_logit_abs_diff": float((got - other).abs().max()),
            "logit_scale": float(want.abs().max()), "loss": [s["loss"] for s in steps],
            "grad_norm": [s["grad_norm"] for s in steps]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: the CI run of this script")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"check": "gpu", "error": "no CUDA device; use --smoke on CPU"}))
        return 2
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29534")
    with tempfile.TemporaryDirectory() as work:
        res = {"check": "gpu" if not args.smoke else "gpu-smoke-cpu", "torch": torch.__version__,
               "device": torch.cuda.get_device_name(0) if not args.smoke else "cpu"}
        res["lm_train"] = lm_train(work, args.smoke)
        res["shared_prefix"] = shared_prefix(args.smoke)
        res["memory"] = memory(work, args.smoke)
        res["moe"] = moe(work, args.smoke)
    sp = res["shared_prefix"]
    res["ratio"] = sp["speedup"]  # shared-prefix step vs the naive rows (the baseline users run)
    res["ok"] = (res["lm_train"]["rc"] == 0 and sp["max_logprob_abs_diff"] <= (1e-4 if args.smoke else 5e-2)
                 and sp["compiles_over_10_steps"] <= 2 and res["moe"]["max_logit_abs_diff"] <= 1e-3
                and all(g > 0 for g in res["moe"]["grad_norm"]))
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
