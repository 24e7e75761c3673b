"""RoPE scalings (llama3, linear, yarn) and activation recompute.

Unit: our inv_freq / attention factor equal transformers' own ROPE_INIT_FUNCTIONS bit for bit;
YaRN's attention factor reaches megatron as softmax_scale; ``train.recompute`` maps to
megatron-core's settings; the tiny models' defaults are unchanged.

Multirank (one launch, world 4, tests/workers/rope_recompute.py): a tiny Llama with
``rope_type: llama3`` at megatron TP2 x PP2 gives HF's logits within 1e-5, and its vLLM log-probs
match megatron's within 1e-4 (fp32); the same weights with plain RoPE (the negative control) miss
both by > 1e-3. Full and selective recompute give the same loss and grad norm as none with less
saved-activation memory.
"""
import fcntl
import json
import os

import pytest
import torch

from _launch import MODEL_CACHE, REPO, torchrun

WORKER = os.path.join(REPO, "tests", "workers", "rope_recompute.py")
# original_max_position_embeddings=32 (< the tiny model's 512): 13 of 16 frequencies are divided by 8,
# 2 blended, so the scaling shows within a few dozen positions.
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
VARIANTS = {
    "default": None,
    "llama3": LLAMA3,
    "linear": dict(rope_type="linear", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128),
    "yarn-mscale": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, mscale=1.2,
                        mscale_all_dim=0.8, beta_fast=16, truncate=False),
    "yarn-attention": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64, attention_factor=1.3),
}


def _hf_reference(cfg):
    """transformers' own inv_freq and attention factor for ``cfg`` (independent of our code)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")


@pytest.mark.unit
@pytest.mark.parametrize("name", VARIANTS)
def test_inv_freq_equals_transformers(name):
    from megatron_rl.models import rope_inv_freq
    from megatron_rl.models.tiny import tiny_hf_config

    cfg = tiny_hf_config("llama", rope_parameters=VARIANTS[name])
    ours, attention = rope_inv_freq(cfg)
    want, want_attention = _hf_reference(cfg)
    assert ours.dtype == torch.float32 and torch.equal(ours, want), (ours - want).abs().max()
    assert attention == pytest.approx(want_attention, rel=1e-12)
    if name != "default":  # the scaling does change the frequencies
        plain, _ = rope_inv_freq(tiny_hf_config("llama"))
        assert (ours - plain).abs().max() > 1e-3


@pytest.mark.unit
def test_megatron_config_rope_and_recompute():
    import math

    from megatron_rl.config import ParallelConfig
    from megatron_rl.models import megatron_config
    from megatron_rl.models.tiny import tiny_hf_config
    from megatron_rl.parallel.grid import LayoutError

    par = ParallelConfig()
    plain = megatron_config(tiny_hf_config("llama"), parallel=par)
    assert plain.softmax_scale is None and plain.recompute_granularity is None
    yarn = megatron_config(tiny_hf_config("llama", rope_parameters=VARIANTS["yarn-attention"]), parallel=par)
    assert yarn.softmax_scale == pytest.approx(1.3 ** 2 / math.sqrt(32), rel=1e-12)  # cos, sin x 1.3 each
    full = megatron_config(tiny_hf_config("llama"), parallel=par, recompute="full")
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    sel = megatron_config(tiny_hf_config("llama"), parallel=par, recompute="selective")
    assert sel.recompute_granularity == "selective" and sel.recompute_modules == ["core_attn"]
    with pytest.raises(LayoutError, match="recompute='block' is unknown; fix: use one of none, full, selective"):
        megatron_config(tiny_hf_config("llama"), parallel=par, recompute="block")


@pytest.mark.unit
def test_tiny_defaults_unchanged():
    from megatron_rl.models.tiny import tiny_hf_config

    cfg = tiny_hf_config("llama")
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    scaled = tiny_hf_config("llama", rope_parameters=LLAMA3)
    assert scaled.rope_parameters == dict(LLAMA3, rope_theta=10000.0)
    assert {k: v for k, v in scaled.to_dict().items() if k != "rope_parameters"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "rope_parameters"}


def llama3_model(plain_path: str) -> str:
    """The llama3-rope tiny Llama (seed 0: the same weights as ``plain_path``), built once."""
    from megatron_rl.models.tiny import make_tiny_model

    path = os.path.join(MODEL_CACHE, "llama-rope-llama3")
    with open(os.path.join(MODEL_CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(path, "config.json")):
            make_tiny_model(path, family="llama", seed=0, rope_parameters=LLAMA3)
    return path


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    from safetensors.torch import load_file

    plain = tiny_models["llama"]
    path = llama3_model(plain)
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(plain, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the control must share the weights"
    assert json.load(open(os.path.join(path, "config.json")))["rope_parameters"]["rope_type"] == "llama3"
    out = tmp_path_factory.mktemp("rope_recompute")
    _, ranks = torchrun(WORKER, nproc=4, out_dir=str(out), args=[path, plain], timeout=1500)
    print("seconds per check:", ranks[0]["seconds"])
    return ranks


def _scaled_vs_plain(rows: list, *, what: str, tol: float, control: str) -> None:
    """Each row: the llama3-scaled model's max deviation (``llama3``, must be <= ``tol``) and the
    plain-RoPE negative control's (``plain``, must be > 1e-3: dropping the scaling must show)."""
    for r in rows:
        print(f"{what}: llama3 {r['llama3']:.3g}, plain-RoPE control {r['plain']:.3g}")
        assert r["llama3"] <= tol, r
        assert r["plain"] > 1e-3, f"negative control: {control}: {r}"


@pytest.mark.multirank
@pytest.mark.slow
def test_llama3_logits_match_hf_at_tp2_pp2(results):
    last = [r["logits"] for r in results if "llama3" in r["logits"]]
    assert len(last) == 2  # the two TP ranks of the last PP stage
    assert all(r["hf_logit_scale"] > 0.1 for r in last), last
    _scaled_vs_plain(last, what="max |logit - HF|", tol=1e-5, control="dropping the scaling must change the logits")


@pytest.mark.multirank
@pytest.mark.slow
def test_llama3_rollout_train_mismatch(results):
    mismatch = [r["mismatch"] for r in results]
    assert all(m["response_tokens"] >= 100 for m in mismatch), mismatch
    _scaled_vs_plain(mismatch, what="max |vLLM - megatron| log-prob", tol=1e-4,
                     control="megatron without the scaling must disagree with vLLM")


@pytest.mark.multirank
@pytest.mark.slow
def test_recompute_same_numbers_less_memory(results):
    for r in results:
        rc = r["recompute"]
        print(f"rank {r['rank']}: peak saved activations MiB none {rc['none']['peak_saved_mib']:.2f}, "
              f"full {rc['full']['peak_saved_mib']:.2f}, selective {rc['selective']['peak_saved_mib']:.2f}")
        assert (rc["none"]["granularity"], rc["full"]["granularity"], rc["selective"]["granularity"]) == \
            (None, "full", "selective")
        for mode in ("full", "selective"):
            for key in ("loss", "grad_norm"):
                got, want = rc[mode][key], rc["none"][key]
                assert abs(got - want) <= 1e-6 * abs(want), f"{mode} {key}: {got} vs none {want}"
        assert rc["full"]["peak_saved_mib"] < 0.75 * rc["none"]["peak_saved_mib"], rc
        assert rc["selective"]["peak_saved_mib"] < rc["none"]["peak_saved_mib"], rc
