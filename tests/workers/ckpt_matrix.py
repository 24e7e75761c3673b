"""Worker (torchrun, world 4): conversion acceptance in one launch.

For each family, HF -> Megatron at every (TP, PP) (DP fills the rest of the world), then a
fresh model loads the converted checkpoint and its logits are compared with HF transformers'
on the same tokens. Then HF -> M(2,2) -> HF and M(2,2) -> M(1,1) -> HF (the export and the
reshard are plans run by the sync executor, with ``verify``), compared bitwise,
and a load of the (2,2) checkpoint at another layout (megatron-core reshards on load).
Last, the RL-checkpoint round trip of the distributed optimizer on llama
(tests/workers/rlckpt_distopt.py), which needs the same world of 4 and no vLLM.
Args: OUT_DIR from the env; argv: model paths as family=path.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import write_result  # noqa: E402
from rlckpt_distopt import round_trip  # noqa: E402
from megatron_rl.checkpoint import spmd  # noqa: E402
from megatron_rl.checkpoint.hf import open_hf  # noqa: E402
from megatron_rl.config import ParallelConfig  # noqa: E402
from megatron_rl.models import build_gpt  # noqa: E402
from megatron_rl.parallel import destroy_distributed  # noqa: E402

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]


def forward_logits(model, tokens, vocab):
    """Full (B, S, vocab) logits on every rank, through megatron's pipeline schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B, S = tokens.shape
    pos = torch.arange(S).unsqueeze(0).expand(B, S)

    def step(_it, m):
        return m(tokens, pos, attention_mask=None), (lambda out, non_loss_data=False: out)

    with torch.no_grad():
        store = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                            num_microbatches=1, seq_length=S, micro_batch_size=B,
                                            forward_only=True, collect_non_loss_data=True)
    full = torch.zeros(B, S, vocab)
    if ps.is_pipeline_last_stage():
        local = store[0].float().contiguous()  # (B, S, V_pad / TP)
        parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
        full = torch.cat(parts, dim=-1)[..., :vocab].contiguous()  # (B, S, vocab)
    # every rank gets the last stage's logits (the last rank is on the last stage)
    dist.broadcast(full, src=dist.get_world_size() - 1)
    return full


def hf_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return m(tokens).logits.float()


def bitwise(a_dir, b_dir):
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out
    a, b = load(a_dir), load(b_dir)
    diff = [n for n in a if n not in b or a[n].dtype != b[n].dtype or a[n].shape != b[n].shape
            or not torch.equal(a[n], b[n])]
    return {"tensors": len(a), "names_equal": sorted(a) == sorted(b), "unequal": diff}


def main():
    paths = dict(a.split("=", 1) for a in sys.argv[1:])
    work = os.path.join(os.environ["OUT_DIR"], "work")
    spmd.ensure_process_group()
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 100, (2, 24), generator=g)
    res = {"logits": {}, "skipped": [], "times": {}, "threads": []}
    for fam, src in paths.items():
        ref = hf_logits(src, tokens)
        shape = open_hf(src).shape
        for tp, pp in LAYOUTS:
            if shape.kv_heads % tp:
                res["skipped"].append(f"{fam} tp{tp}pp{pp}: tp does not divide kv_heads={shape.kv_heads}")
                continue
            t0 = time.time()
            out = os.path.join(work, f"{fam}-tp{tp}pp{pp}")
            # The tool's own steps, with one parallel state per layout: fill from HF, save atomically,
            # then a fresh model loads the saved checkpoint.
            ckpt = open_hf(src)
            model, params, layout = spmd.setup_model(ckpt.config, tp=tp, pp=pp, dtype=torch.float32,
                                                     vocab_divisible_by=128)
            spmd.fill_from_hf(params, layout, ckpt)
            spmd.save_checkpoint(model, out, hf_dir=src)
            (fresh,) = build_gpt(ckpt.config, parallel=ParallelConfig(tp=tp, pp=pp), dtype=torch.float32)
            spmd.load_checkpoint(fresh, out)
            got = forward_logits(fresh, tokens, shape.vocab)
            destroy_distributed(keep_process_group=True)
            res["threads"].append(len(os.listdir("/proc/self/task")))  # freed groups leave no threads
            res["logits"][f"{fam} tp{tp}pp{pp}"] = (got - ref).abs().max().item()
            res["times"][f"{fam} tp{tp}pp{pp}"] = round(time.time() - t0, 2)
        # Megatron-core reshards our checkpoint on load: the (2,2) checkpoint at TP1 x PP2.
        _, model, _, _ = spmd.load_megatron(os.path.join(work, f"{fam}-tp2pp2"), tp=1, pp=2)
        res["logits"][f"{fam} saved tp2pp2 loaded tp1pp2"] = (forward_logits(model, tokens, shape.vocab) - ref).abs().max().item()
        destroy_distributed(keep_process_group=True)
        # HF -> M(2,2) -> HF, and M(2,2) -> M(1,1) -> HF: bitwise.
        m22 = os.path.join(work, f"{fam}-tp2pp2")
        spmd.convert("megatron-to-hf", src=m22, out=os.path.join(work, f"{fam}-hf-from22"), verify=True)
        spmd.convert("reshard", src=m22, out=os.path.join(work, f"{fam}-tp1pp1-from22"), tp=1, pp=1, verify=True)
        spmd.convert("megatron-to-hf", src=os.path.join(work, f"{fam}-tp1pp1-from22"),
                     out=os.path.join(work, f"{fam}-hf-from11"))
        if rank == 0:
            res[f"{fam} hf->m22->hf"] = bitwise(src, os.path.join(work, f"{fam}-hf-from22"))
            res[f"{fam} m22->m11->hf"] = bitwise(src, os.path.join(work, f"{fam}-hf-from11"))
            meta = json.load(open(os.path.join(work, f"{fam}-tp1pp1-from22", "megatron_rl.json")))
            res[f"{fam} m11 meta"] = {k: meta[k] for k in ("tp", "pp", "padded_vocab", "param_dtype", "hf_dtype")}
            res[f"{fam} leftovers"] = sorted(f for f in os.listdir(work) if f.startswith("."))
    destroy_distributed(keep_process_group=True)
    res["distopt"] = round_trip(paths["llama"], os.path.join(os.environ["OUT_DIR"], "rlckpt-distopt"))
    write_result(res)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
