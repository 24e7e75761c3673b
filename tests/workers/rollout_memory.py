"""Worker (torchrun, world 2, vLLM TP2): memory really returns on release, outputs survive resume.

Big tiny model (~53M params) and a KV cache of several hundred MB per rank, so RSS drops are
far above noise. Checks, in one launch: KV release/resume, weight offload, weight discard +
refill through load_shards (the receiver API), the full-HF baseline path, illegal-transition
texts on this path. Writes figures per rank; tests/test_rollout.py asserts on them.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import write_result  # noqa: E402
from rollout_models import rollout_model  # noqa: E402


def prompts_for(vocab: int, n: int = 4, length: int = 200) -> list:
    # Longer than one KV block (128 tokens), so a stale prefix cache would change outputs.
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def expect_error(fn, *args, **kw) -> str:
    try:
        fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the test asserts on the text
        return f"{type(e).__name__}: {e}"
    return "NO ERROR"


def cuda_cycles(eng, same, lp_diff) -> dict:
    """CUDA: sleep (level 1 offloads the weights to the host, level 2 discards them) returns the
    KV cache and the weights to the device, measured by the driver's free memory (vLLM's CuMem
    pool is invisible to torch's allocator counters); wake_up per tag brings them back."""
    import torch

    out = {}
    shards = eng.weights.read_shards()  # host copy, to refill discarded weights
    for mode in ("offload", "discard"):
        eng.set_weights_release(mode)
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        r = eng.release(["kv_cache", "weights"])
        free1 = torch.cuda.mem_get_info()[0]
        eng.resume(["weights"])
        if mode == "discard":
            eng.begin_weight_update()
            eng.load_shards((n, t.cuda()) for n, t in shards.items())
            eng.end_weight_update()
        eng.resume(["kv_cache"])
        out[mode] = {"freed": free1 - free0, "held": r.extra["kv_cache_bytes_before"] + r.extra["weight_bytes_before"],
                     "same": same(), "lp_diff": lp_diff()}
    return out


def main():
    from megatron_rl.config import RolloutConfig
    from megatron_rl.rollout.base import Sampling
    from megatron_rl.parallel import rollout_topology
    from megatron_rl.rollout.vllm_engine import VllmEngine

    dist.init_process_group("gloo")
    out_dir = os.environ["OUT_DIR"]
    path = rollout_model(os.path.join(os.path.dirname(out_dir), "models", "big"))
    cfg = RolloutConfig(tp=2, kv_cache_bytes=int(os.environ.get("KV_BYTES", 384 << 20)), max_model_len=512,
                        weights_release="offload", seed=0)
    eng = VllmEngine(path, cfg=cfg, topo=rollout_topology(rollout_tp=cfg.tp), run_dir=out_dir)
    greedy = Sampling(temperature=0.0, max_new_tokens=24)
    plp = Sampling(temperature=0.0, max_new_tokens=1, prompt_logprobs=True)
    prompts = prompts_for(32000)
    ref = [g.tokens for g in eng.generate(prompts, sampling=greedy)]
    ref_lp = [g.prompt_logprobs[1:] for g in eng.generate(prompts, sampling=plp)]
    res = {"rank": dist.get_rank(), "started": vars(eng.memory("started"))}

    def lp_diff():
        got = [g.prompt_logprobs[1:] for g in eng.generate(prompts, sampling=plp)]
        return max(abs(a - b) for x, y in zip(got, ref_lp) for a, b in zip(x, y))

    def same():
        return [g.tokens for g in eng.generate(prompts, sampling=greedy)] == ref

    if eng.cuda:  # CUDA sleep releases both tags together; see cuda_cycles
        res["cuda"] = cuda_cycles(eng, same, lp_diff)
        res["reports"] = [vars(m) for m in eng.reports]
        write_result(res)
        dist.barrier()
        return

    # 1. KV cache.
    r = eng.release(["kv_cache"])
    res["kv"] = {"bytes": r.extra["kv_cache_bytes_before"], "rss_drop": r.extra["rss_before"] - r.rss,
                 "kv_after": r.kv_cache_bytes,
                 "gen_error": expect_error(eng.generate, prompts, sampling=greedy)}
    r = eng.resume(["kv_cache"])
    res["kv"].update(rss_regain=r.rss - r.extra["rss_before"], same=same(), kv_back=r.kv_cache_bytes)

    # 2. Weights, offload (host copy in a file of the run directory).
    r = eng.release(["weights"])
    res["offload"] = {"bytes": r.extra["weight_bytes_before"], "rss_drop": r.extra["rss_before"] - r.rss,
                      "weights_after": r.weight_bytes,
                      "gen_error": expect_error(eng.generate, prompts, sampling=greedy),
                      "sync_error": expect_error(eng.begin_weight_update)}
    eng.resume(["weights"])
    res["offload"].update(same=same(), lp_diff=lp_diff())

    # 3. Weights, discard: a host copy of the correct shards refills them through load_shards.
    shards = eng.weights.read_shards()
    eng.set_weights_release("discard")
    r = eng.release(["weights"])
    res["discard"] = {"bytes": r.extra["weight_bytes_before"], "rss_drop": r.extra["rss_before"] - r.rss}
    eng.resume(["weights"])
    res["discard"]["gen_error"] = expect_error(eng.generate, prompts, sampling=greedy)
    names = sorted(shards)
    eng.begin_weight_update()
    eng.load_shards((n, shards[n]) for n in names[: len(names) // 2])  # two buckets
    eng.load_shards((n, shards[n]) for n in names[len(names) // 2:])
    eng.end_weight_update()
    res["discard"].update(same=same(), lp_diff=lp_diff(), state=eng.state.short())
    del shards

    # 4. The baseline: full HF tensors, vLLM slices them (layerwise reload, checkpoint format).
    from safetensors.torch import load_file

    eng.update_weights(load_file(os.path.join(path, "model.safetensors")).items())
    res["hf_update"] = {"same": same(), "lp_diff": lp_diff()}
    res["reports"] = [vars(m) for m in eng.reports]
    write_result(res)
    dist.barrier()


if __name__ == "__main__":
    main()
