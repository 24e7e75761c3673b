"""The human-readable table of a plan (:func:`megatron_rl.plan.command.run`'s dict)."""
from __future__ import annotations

GiB = 1 << 30


def _g(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def _train_rows(t: dict) -> list[str]:
    return [f"  weights ({t['label']})           {_g(t['weights'])}",
            f"  grads (fp32)                 {_g(t['grads'])}",
            f"  master weights (fp32)        {_g(t['master'])}",
            f"  Adam moments (fp32)          {_g(t['adam'])}",
            f"  master + Adam, no dist. opt. {_g(t['master_adam_unsharded'])}",
            f"  activations ({t['in_flight']} in flight)   {_g(t['activations'])}",
            f"  recompute / backward working {_g(t['working_set'])}",
            f"  pipeline buffers             {_g(t['pipeline'])}",
            f"  sequence-parallel buffer     {_g(t['sp_buffer'])}",
            f"  logits + log-softmax         {_g(t['logits'])}",
            f"  step peak                    {_g(t['step_peak'])}"]


def render(out: dict) -> str:
    mb, r, s, sh = out["micro_batch"], out["rollout"], out["sync"], out["shapes"]
    lines = [f"megatron-rl plan: {out['plan']}, {out['world_size']} ranks, {out['gpu_bytes'] / GiB:.0f} GiB per GPU",
             "validation                     ok (config, HF config, world size)",
             f"model config                   {out['hf_config']}/config.json"
             + (" (published copy: model.hf_path is not on this machine)" if out["hf_config_is_published_copy"] else ""),
             f"shapes                         {sh['positions']} rank positions built on meta; layout algebra "
             + ("agrees" if sh["layout_agrees"] else f"DISAGREES: {sh['mismatches']}"),
             f"largest micro-batch            {mb['tokens']} tokens, {mb['response_tokens']} response tokens, "
             f"{mb['per_step']} per step",
             "training, first stage:"] + _train_rows(out["train_first"])
    if out["train_worst"]["label"] != out["train_first"]["label"]:
        lines += ["training, worst rank:"] + _train_rows(out["train_worst"])
    lines += ["rollout (vLLM):",
              f"  share (gpu_memory_utilization) {_g(r['budget'])}",
              f"  weights at rollout.tp        {_g(r['weights'])}",
              f"  profile activations          {_g(r['activations'])}",
              f"  KV cache                     {_g(r['kv_cache'])}  ({r['kv_tokens']} tokens, "
              f"{r['sequences']} full sequences)",
              "  during rollout: the training state stays resident beside vLLM's share",
              f"  sleep releases KV cache and weights; stays: CUDA graphs ~{_g(r['residual']).strip()}",
              "weight sync:",
              f"  bytes moved                  {_g(s['bytes_moved'])}  "
              f"(busiest rank {_g(s['max_rank_bytes']).strip()})",
              f"  buckets                      {s['buckets']:8d}",
              f"  peak extra memory            {_g(s['peak_extra_bytes'])}",
              f"  time on the links            {s['seconds']:8.2f} s  (bound {s['bound_seconds']:.2f} s)",
              f"  sync_makespan_over_bound     {out['sync_makespan_over_bound']:8.3f}  (under the planner's cost "
              "model: sync_cost)",
              "phases (peak per rank, reserve included):"]
    lines += [f"  {k:28s} {_g(v)}" for k, v in out["phases"].items()]
    verdict = out["verdict"] + ("" if out["fits"] else f": {out['breaking_term']}; fix: {out['fix']}")
    lines.append(f"verdict                        {verdict}")
    return "\n".join(lines)
