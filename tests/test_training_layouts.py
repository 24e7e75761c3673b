"""Acceptance: every training layout reproduces the TP1 (world 1) loss and grad norm.

Over 2 optimizer steps (Adam, lr 1e-3, fp32, no clipping, the same global batch of 8
sequences x 16 tokens), TP2xPP2, TP2xPP2+SP+distributed optimizer, TP1xPP2xDP2, TP2xCP2 and
TP1xPP2xCP2 must match the world-1 run to <= 1e-5 relative, for Llama (GQA, untied), Qwen2
(qkv bias, tied: exercises the PP embedding sync) and Qwen3 (qk-norm). The same launch checks
that every rank's parameter names and shapes equal the layout algebra
(``megatron_rank_tensors``). Two launches: world 1 (reference) and world 4 (all layouts,
built one after the other in the same processes).

Mixture of experts (tiny Qwen3-MoE, 8 experts, top-2, megatron's aux loss on): EP2 (x DP2) and
PP2 x EP2 reproduce the world-1 EP1 run in the same launches (``MOE_LAYOUTS``); as for every
family, the reference must train (its loss falls), and each EP rank's parameters must be the
layout algebra's (its own experts).
"""
import json
import os

import pytest

from _launch import REPO, torchrun

pytestmark = pytest.mark.multirank

WORKER = os.path.join(REPO, "tests", "workers", "train_layouts.py")
FAMILIES = ("llama", "qwen2", "qwen3")
LAYOUTS = ("2,2,1", "2,2,1,sp,do", "1,2,1", "2,1,2", "1,2,2")  # tp,pp,cp[,sp][,do]; dp fills world 4
MOE = "qwen3-moe"
MOE_REF = "1,1,1,ep1"
MOE_LAYOUTS = ("1,1,1,ep2", "1,2,1,ep2", "2,1,1,sp,ep2")  # EP2 x DP2, PP2 x EP2 (expert DP 1), TP2 x EP2
RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory):
    paths = json.dumps({f: tiny_models[f] for f in (*FAMILIES, MOE)})
    out = tmp_path_factory.mktemp("train_layouts")
    _, ref = torchrun(WORKER, nproc=1, out_dir=str(out / "w1"), args=[paths, "1,1,1", MOE_REF], timeout=300)
    _, ranks = torchrun(WORKER, nproc=4, out_dir=str(out / "w4"), args=[paths, *LAYOUTS, *MOE_LAYOUTS],
                        timeout=400)
    return dict(ref[0]["1,1,1"], **ref[0][MOE_REF]), ranks


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("layout", LAYOUTS + MOE_LAYOUTS)
def test_layout_matches_tp1(results, layout):
    ref, ranks = results
    for family in (MOE,) if layout in MOE_LAYOUTS else FAMILIES:
        r = ref[family]
        assert r["loss"][1] < r["loss"][0], f"{family}: the reference did not train: {r['loss']}"
        for rank, res in enumerate(ranks):
            got = res[layout][family]
            assert got["names_ok"], f"{layout} {family} rank {rank}: parameter names/shapes differ from the layout"
            assert got["tokens"] == r["tokens"], f"{layout} {family}: global token count {got['tokens']} != {r['tokens']}"
            for key in ("loss", "grad_norm"):
                for step, (g, e) in enumerate(zip(got[key], r[key])):
                    assert _rel(g, e) <= RTOL, (f"{layout} {family} rank {rank} step {step}: {key} {g!r} vs TP1 {e!r} "
                                                f"(rel {_rel(g, e):.2e} > {RTOL})")


def test_reference_names(results):
    ref, _ = results
    assert all(ref[f]["names_ok"] for f in (*FAMILIES, MOE))
