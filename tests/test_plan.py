"""``megatron-rl plan`` on the shipped GPU configs, and its memory estimate against a real step.

Unit (in-process, the HF configs from tests/fixtures/models): both GPU configs fit on 80 GiB
with a sync makespan <= 1.15 x the per-rank bound; the 70B config with ``train.recompute=none``
does not fit, naming the activations and ``train.recompute``. Per-rank parameters summed over
one model replica equal the HF checkpoint's parameter count (computed from the published shape,
not from megatron); the optimizer terms follow ``parallel.distributed_optimizer``.

Multirank (one launch, world 4, tests/workers/plan_memory.py): the tiny model at TP2 x PP2 on
CPU. The plan's parameter terms and its activation terms each fall within 25% of what the
torch profiler's memory view (``profile_memory``; allocations matched to frees by address) sees
a real training step allocate, for ``train.recompute`` none and full; the estimate for a doubled
micro-batch (the negative control) misses by more than 25%.
"""
import os

import pytest
from transformers import AutoConfig

from _launch import REPO, torchrun
from megatron_rl.plan.command import _args, main, run

FIXTURES = os.path.join(REPO, "tests", "fixtures", "models")
# As a user types it: model.hf_path (/models/...) is absent here, so the published copy beside the
# config (configs/models/<Name>) is used, and the output says so.
GPU_70B = ["--config", os.path.join(REPO, "configs", "gpu_70b_64gpu.yaml")]
GPU_7B = ["--config", os.path.join(REPO, "configs", "gpu_7b_8gpu.yaml")]
GPU_7B_PPO = ["--config", os.path.join(REPO, "configs", "gpu_7b_8gpu_ppo.yaml")]


def _hf_params(name: str, *, tp: int) -> int:
    """Parameters of the HF checkpoint, from the published config alone (untied: embed + head),
    with the RMSNorm weights counted ``tp`` times (every TP rank holds them whole)."""
    c = AutoConfig.from_pretrained(os.path.join(FIXTURES, name))
    h, f, L, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    d = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    bias = (q + 2 * kv) if c.architectures[0] == "Qwen2ForCausalLM" else 0
    layer = h * (q + 2 * kv) + bias + q * h + 3 * h * f + 2 * h
    return L * layer + h + v * h * (1 if c.tie_word_embeddings else 2) + (tp - 1) * (2 * L * h + h)


@pytest.fixture(scope="module")
def plans():
    """Each plan once (the 70B's sync plan is cached for the recompute=none run)."""
    return {"70b": run(_args(GPU_70B)), "7b": run(_args(GPU_7B)),
            "70b-none": run(_args(GPU_70B + ["train.recompute=none"])), "7b-ppo": run(_args(GPU_7B_PPO))}


@pytest.mark.unit
@pytest.mark.parametrize("name", ["70b", "7b"])
def test_gpu_configs_fit(plans, name):
    out = plans[name]
    assert out["verdict"] == "fits" and out["fits"], (out["breaking_term"], out["phases"])
    assert out["sync_makespan_over_bound"] <= 1.15
    assert out["shapes"]["layout_agrees"], out["shapes"]["mismatches"]
    assert max(out["phases"].values()) <= out["gpu_bytes"]
    assert out["rollout"]["sequences"] >= 1 and out["sync"]["bytes_moved"] > 0
    model = {"70b": "Llama-3.1-70B-Instruct", "7b": "Qwen2.5-7B-Instruct"}[name]
    assert out["hf_config_is_published_copy"], out["hf_config"]
    assert out["hf_config"] == os.path.join(REPO, "configs", "models", model), out["hf_config"]


@pytest.mark.unit
@pytest.mark.parametrize("name,model,tp,pp", [("70b", "Llama-3.1-70B", 8, 4), ("7b", "Qwen2.5-7B", 4, 1)])
def test_rank_params_add_up_to_the_checkpoint(plans, name, model, tp, pp):
    counts = plans[name]["shapes"]["params_per_rank"]
    assert len(counts) == tp * pp
    assert sum(counts.values()) == _hf_params(model, tp=tp)  # neither vocab needs padding at these TP degrees


@pytest.mark.unit
def test_optimizer_terms_follow_the_distributed_optimizer(plans):
    t = plans["70b"]["train_first"]
    n = plans["70b"]["shapes"]["params_per_rank"]["tp0/pp0"]
    assert (t["weights"], t["grads"]) == (2 * n, 4 * n)  # bf16 params, fp32 grad buffers
    assert t["master"] + t["adam"] == 12 * n // 2  # sharded over DP = 64 / (8 x 4)
    assert t["master_adam_unsharded"] == 12 * n


@pytest.mark.unit
def test_ppo_config_fits_with_its_critic(plans):
    """The critic trains while the policy's state stays resident: its phase holds two model states."""
    ppo, grpo = plans["7b-ppo"], plans["7b"]
    assert ppo["verdict"] == "fits", (ppo["breaking_term"], ppo["phases"])
    assert "critic_train" in ppo["phases"] and "critic_train" not in grpo["phases"]
    state = ppo["train_worst"]["state"]
    assert ppo["phases"]["critic_train"] >= 2 * state > ppo["phases"]["train"] - ppo["train_worst"]["activation_terms"]


@pytest.mark.unit
def test_recompute_off_does_not_fit(plans):
    out = plans["70b-none"]
    assert out["verdict"] == "does not fit" and not out["fits"]
    assert "activations" in out["breaking_term"] and "train.recompute" in out["fix"], out
    assert out["phases"]["train"] > 4 * plans["70b"]["phases"]["train"]


@pytest.mark.unit
def test_plan_errors_are_one_line(capsys, tmp_path):
    assert main(GPU_7B + ["--check-files", "--json"]) == 2  # the real path is asked for, and /models/... is not here
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: model.hf_path:") and "--hf-config" in err and "\n" not in err
    assert main(GPU_7B + ["--hf-config", str(tmp_path), "--json"]) == 2  # an explicit dir without config.json
    assert "--hf-config" in capsys.readouterr().err
    assert main(GPU_7B + ["--world-size", "6"]) == 2
    assert "parallel.world_size" in capsys.readouterr().err


# -- estimate vs measurement (multirank) -----------------------------------------------------------


def _estimates(recompute: str, *, doubled: bool = False) -> dict:
    """The plan's terms per (tp, pp) for configs/tiny_cpu.yaml; ``doubled``: prompts and
    responses twice as long (a micro-batch of twice the tokens, as many of them)."""
    from megatron_rl.config import load_config
    from megatron_rl.models.shape import ModelShape
    from megatron_rl.models.tiny import tiny_hf_config
    from megatron_rl.plan.memory import largest_micro_batch, train_memory
    from megatron_rl.plan.shapes import build_shapes

    longer = ["data.max_prompt_len=64", "rollout.max_new_tokens=32"] if doubled else []
    cfg = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"),
                      overrides=[f"train.recompute={recompute}"] + longer)
    hf = tiny_hf_config("llama")  # what make-tiny-model writes to runs/tiny-llama
    ranks = build_shapes(cfg, hf, world_size=4)
    mb = largest_micro_batch(cfg, world_size=4)
    return {(r.tp, r.pp): train_memory(cfg, ModelShape.from_hf_config(hf), r, mb, world_size=4) for r in ranks}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    _, rows = torchrun(os.path.join(REPO, "tests", "workers", "plan_memory.py"), nproc=4,
                       out_dir=str(tmp_path_factory.mktemp("plan_memory")), args=["none,full"], timeout=600)
    return rows


@pytest.mark.multirank
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_estimate_meets_a_real_step(measured, recompute):
    est = _estimates(recompute)
    doubled = _estimates(recompute, doubled=True)
    for row in measured:
        got, e = row[recompute], est[(row["tp"], row["pp"])]
        assert got["tokens"] == 640 and got["micro_batches"] == 2, got  # the plan's largest micro-batch
        assert abs(e.state - got["state"]) <= 0.25 * got["state"], (row, e)
        assert abs(e.activation_terms - got["step_peak"]) <= 0.25 * got["step_peak"], (row, e)
        wrong = doubled[(row["tp"], row["pp"])].activation_terms
        assert wrong > 1.25 * got["step_peak"], (row, wrong)  # negative control: a doubled micro-batch misses
        print(f"rank {row['rank']} {recompute}: state {e.state} est / {got['state']} measured, "
              f"step {e.activation_terms} est / {got['step_peak']} measured (doubled: {wrong})")
