"""Worker (torchrun, world 4 = vLLM TP2 x 2 replicas, beside megatron TP2 x PP2 parallel state).

One launch checks: dummy start then the first sync makes the engine exact (shards bitwise vs
HF, prompt log-probs vs HF transformers); replicas split the prompts and every rank gets all
results; every illegal transition raises its error text; a tag mismatch across ranks is
detected on every rank; 20 release/resume cycles (both tags) with a generate in between.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _launch import tiny_model_paths, write_result  # noqa: E402
from rollout_memory import expect_error, prompts_for  # noqa: E402


def hf_prompt_logprobs(path: str, prompts: list) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])  # (1, T)
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
            out.append(logp[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist())
    return out


def illegal_transitions(eng, prompts, greedy, shards) -> dict:
    """Every illegal call, with the error text it raised (tests assert on the text)."""
    e = {}
    eng.release(["kv_cache"])
    e["generate_kv_released"] = expect_error(eng.generate, prompts, sampling=greedy)
    e["release_twice"] = expect_error(eng.release, ["kv_cache"])
    eng.resume(["kv_cache"])
    e["resume_not_released"] = expect_error(eng.resume, ["kv_cache"])
    e["unknown_tag"] = expect_error(eng.release, ["kv"])
    e["string_tag"] = expect_error(eng.release, "weights")
    e["load_outside_sync"] = expect_error(eng.load_shards, [])
    eng.set_weights_release("discard")
    eng.release(["weights"])
    e["generate_weights_released"] = expect_error(eng.generate, prompts, sampling=greedy)
    e["sync_while_released"] = expect_error(eng.begin_weight_update)
    eng.resume(["weights"])
    e["generate_discarded_no_sync"] = expect_error(eng.generate, prompts, sampling=greedy)
    eng.begin_weight_update()
    first = sorted(shards)[0]
    eng.load_shards([(first, shards[first])])
    e["partial_sync_after_discard"] = expect_error(eng.end_weight_update)
    e["generate_after_partial_sync"] = expect_error(eng.generate, prompts, sampling=greedy)
    e["bad_shape"] = expect_error(lambda: (eng.begin_weight_update(), eng.load_shards([(first, torch.zeros(3))])))
    e["unknown_name"] = expect_error(eng.load_shards, [("model.nope.weight", torch.zeros(3))])
    eng.load_shards(shards.items())
    eng.end_weight_update()
    # Mismatched tags across ranks: rank 0 releases the KV cache, the others the weights.
    tags = ["kv_cache"] if dist.get_rank() == 0 else ["weights"]
    e["tag_mismatch"] = expect_error(eng.release, tags)
    e["state_after_mismatch"] = eng.state.short()
    eng.set_weights_release("offload")
    return e


def main():
    from megatron_rl.config import ParallelConfig, RolloutConfig
    from megatron_rl.parallel import init_distributed
    from megatron_rl.rollout.base import Sampling
    from megatron_rl.rollout.cpu_memory import rss_bytes
    from megatron_rl.rollout.vllm_engine import VllmEngine

    path = tiny_model_paths()["qwen2"]  # tied embeddings + qkv bias; 2 kv heads split over TP2
    from transformers import AutoConfig

    topo = init_distributed(ParallelConfig(tp=2, pp=2), world_size=4,
                            rollout_tp=2)
    from megatron.core import parallel_state as ps

    out_dir = os.environ["OUT_DIR"]
    cfg = RolloutConfig(tp=2, kv_cache_bytes=32 << 20, max_model_len=512, load_format="dummy",
                        weights_release="offload", seed=0)
    eng = VllmEngine(path, cfg=cfg, topo=topo, run_dir=out_dir)
    res = {"rank": dist.get_rank(), "megatron_tp": ps.get_tensor_model_parallel_world_size(),
           "megatron_pp": ps.get_pipeline_model_parallel_world_size(), "replica": eng.replica}
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    prompts = prompts_for(250, n=6, length=150)
    res["dummy_generate"] = expect_error(eng.generate, prompts, sampling=greedy)

    # First sync (baseline path: full HF tensors) makes the dummy engine exact.
    from safetensors.torch import load_file

    hf = load_file(os.path.join(path, "model.safetensors"))
    eng.update_weights(hf.items())
    shards = eng.weights.read_shards()
    tp, r = 2, eng.tp_rank
    o = hf["model.layers.1.self_attn.o_proj.weight"]
    res["oproj_bitwise"] = torch.equal(shards["model.layers.1.self_attn.o_proj.weight"],
                                       o[:, r * o.shape[1] // tp:(r + 1) * o.shape[1] // tp])
    emb, vocab = shards["model.embed_tokens.weight"], hf["model.embed_tokens.weight"].shape[0]
    rows = emb.shape[0]
    res["embed_bitwise"] = torch.equal(emb[: max(0, min(rows, vocab - r * rows))],
                                       hf["model.embed_tokens.weight"][r * rows:(r + 1) * rows])
    plp = eng.generate(prompts[:2], sampling=Sampling(temperature=0.0, max_new_tokens=1, prompt_logprobs=True))
    if dist.get_rank() == 0:
        want = hf_prompt_logprobs(path, prompts[:2])
        res["hf_lp_diff"] = max(abs(a - b) for g, w in zip(plp, want) for a, b in zip(g.prompt_logprobs[1:], w))

    # Replicas: every rank returns all results, in prompt order, whichever replica served them.
    ref = [g.tokens for g in eng.generate(prompts, sampling=greedy)]
    rev = [g.tokens for g in eng.generate(prompts[::-1], sampling=greedy)]
    res["reversed_same"] = rev[::-1] == ref
    res["ref"] = ref
    res["sampled_lens_ok"] = all(len(g.tokens) == len(g.logprobs) for g in
                                 eng.generate(prompts, sampling=Sampling(temperature=1.0, max_new_tokens=8, seed=3)))

    res["errors"] = illegal_transitions(eng, prompts, greedy, shards)
    res["after_errors_same"] = [g.tokens for g in eng.generate(prompts, sampling=greedy)] == ref
    del shards

    # 20 cycles, both tags, offload mode, a generate in between (one prompt per replica, each
    # longer than a KV block so a stale prefix cache would show).
    n_cycles = int(os.environ.get("CYCLES", 20))
    short = Sampling(temperature=0.0, max_new_tokens=4)
    cyc_prompts = prompts[:2]
    cyc_ref = [g.tokens for g in eng.generate(cyc_prompts, sampling=short)]
    rss, same, t_rel, t_res, t_gen, t0 = [], [], 0.0, 0.0, 0.0, time.perf_counter()
    for _ in range(n_cycles):
        t_rel += eng.release(["kv_cache", "weights"]).extra["seconds"]
        t_res += eng.resume(["weights", "kv_cache"]).extra["seconds"]
        t1 = time.perf_counter()
        same.append([g.tokens for g in eng.generate(cyc_prompts, sampling=short)] == cyc_ref)
        t_gen += time.perf_counter() - t1
        rss.append(rss_bytes())
    res["cycles"] = {"n": n_cycles, "all_same": all(same), "rss_first": rss[0], "rss_last": rss[-1],
                     "rss_max": max(rss), "seconds": time.perf_counter() - t0, "release_s": t_rel,
                     "resume_s": t_res, "generate_s": t_gen, "count": eng.state.cycles}
    res["events_tail"] = [list(map(str, e)) for e in eng.state.events[-4:]]
    write_result(res)
    dist.barrier()


if __name__ == "__main__":
    main()
