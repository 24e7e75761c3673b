"""Tier 2, end to end: `megatron-rl train` runs 3 GRPO steps on CPU at world 4 (megatron-core
TP2 x PP2 with shared-prefix packing, vLLM TP1 x 4 replicas, direct weight sync, release and
resume every step) and writes every metric field; after every sync the rollout's log-probs
equal the trainer's on the same tokens (fp32). It runs with the KL to the frozen reference model
(``algorithm.kl_coef > 0``): the KL is 0 while the policy is still the reference (step 0) and
positive after updates, and the reference's forward is timed as its own phase.

The held-out evaluation runs in the same launch (``logging.eval_every=2``, 16 prompts held out,
pass@2): its metrics are in ``metrics.jsonl`` at steps 0 and 2 (before those steps' rollouts)
and 3 (after the last step), not at step 1, it is the phase "eval" of the table, and at step 0
(the initial weights) its greedy figures equal HF transformers' greedy generations from the same
model, scored independently.

It runs through ``launch/torchrun.sh``, as users do, and checks what a user sees: a quiet console
(a few lines before the first step, no ``[default0]:`` prefixes, no vLLM or torch warnings, which
are in rank 0's own log instead: the negative control) and the PNG of the run (``plot:`` line)."""
import glob
import os
import sys

import pytest

from _launch import REPO, free_port, launch_env, run_group
from megatron_rl.metrics import STEP_FIELDS, read_metrics
from test_plot import read_png

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
TIS_CAP = 1.001  # just above 1: fp32's mismatch (< 1e-4) never reaches it, bf16's does (test_grpo_learns.py)
EVAL = ["data.eval_size=16", "logging.eval_every=2", "data.eval_pass_k=2"]


def test_train_three_steps(tiny_models, tmp_path):
    run = tmp_path / "run"
    env = launch_env(SKIP_ENV="1", NPROC_PER_NODE="4", CONFIG="configs/tiny_cpu.yaml", MASTER_PORT=str(free_port()),
                     PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    overrides = ["train.steps=3", "checkpoint.dir=null", f"logging.run_dir={run}", f"model.hf_path={tiny_models['llama']}",
                 "algorithm.kl_coef=0.05", f"algorithm.tis_cap={TIS_CAP}", *EVAL]
    # stderr into stdout: the console as a terminal shows it, in order
    proc = run_group(["bash", "-c", 'exec bash launch/torchrun.sh "$@" 2>&1', "torchrun.sh", *overrides], env=env,
                     timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # 3: the evaluation after the last step
    _check_eval(rows, model=tiny_models["llama"], overrides=overrides)
    for r in rows[:3]:
        missing = [f for f in STEP_FIELDS if r.get(f) is None]
        assert not missing, (r["step"], missing)
        # vLLM sampled these tokens with weights synced from the trainer: same log-probs (fp32)
        assert r["mismatch/abs_max"] < 1e-4, r
        assert r["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert r["tis_clip_frac"] == 0.0, r  # the negative control of tests/test_grpo_learns.py (bf16: > 0)
        assert r["mem/release_mib"] < r["mem/rollout_mib"], r  # releasing vLLM's memory shows in RSS
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["response_len/mean"] > 0
        assert r["time/ref_s"] > 0 and r["mem/ref_mib"] > 0  # the reference's phase (KL on)
    assert rows[0]["kl"] <= 1e-6, rows[0]  # step 0: the policy is still the reference
    assert rows[1]["kl"] > 1e-6 and rows[2]["kl"] > 1e-6, rows  # after updates it has moved away
    out = proc.stdout
    assert out.count("reward first 20%:") == 1  # rank 0 speaks, once
    _check_console(out, run=str(run))


def _check_eval(rows: list, *, model: str, overrides: list) -> None:
    evals = ["eval/pass@1", "eval/reward_mean", "eval/pass@2", "time/eval_s"]
    assert [r["step"] for r in rows if all(k in r for k in evals)] == [0, 2, 3], rows
    assert not any(k.startswith("eval/") for k in rows[1]), rows[1]  # step 1 is not due (every 2)
    for r in rows:
        if "eval/pass@1" in r:
            assert all(0 <= r[k] <= 1 for k in evals[:3]), r  # (greedy may beat 2 samples: no order)
    want = _hf_greedy_eval(model, overrides)
    assert rows[0]["eval/pass@1"] == pytest.approx(want["pass@1"], abs=1e-9), (rows[0], want)
    assert rows[0]["eval/reward_mean"] == pytest.approx(want["reward_mean"], abs=1e-9), (rows[0], want)


def _hf_greedy_eval(model: str, overrides: list) -> dict:
    """Greedy pass@1 and mean reward of the eval prompts, by HF transformers (not the engine)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rl.config import load_config
    from megatron_rl.data import load_split
    from megatron_rl.rewards import digit_fraction

    cfg = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"), overrides=overrides)
    tok, hf = AutoTokenizer.from_pretrained(model), AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    rewards = []
    for row in load_split(cfg.data).eval:
        ids = torch.tensor([tok(row["prompt"]).input_ids])
        out = hf.generate(ids, max_new_tokens=cfg.rollout.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        out = out[:out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out
        rewards.append(digit_fraction(tok.decode(out, skip_special_tokens=True), response_ids=out))
    assert len(rewards) == 16
    return {"pass@1": sum(r >= 1.0 for r in rewards) / 16, "reward_mean": sum(rewards) / 16}


def _check_console(out: str, *, run: str) -> None:
    lines = out.split("\n")  # not splitlines(): the progress bar's carriage returns are not lines
    first = next(i for i, ln in enumerate(lines) if "step 0: reward" in ln)
    print(f"console: {first} lines before the first step, {len(lines)} in all; they are:\n" + "\n".join(lines[:first]))
    assert first <= 40, "\n".join(lines[:first])
    table = lines[first + 1:first + 4]
    assert table[0].startswith("phase") and table[1].startswith("eval "), table  # the eval phase, first
    assert "held-out accuracy (greedy pass@1, 16 prompts)" in out
    assert "[default" not in out and "WARNING" not in out and "Warning" not in out, out[:4000]
    # Negative control: the warnings exist; they are in rank 0's own log, not on the console.
    rank0 = "".join(open(p).read() for p in glob.glob(f"{run}/logs/*/*/attempt_0/0/std*.log"))
    assert "WARNING" in rank0 and "Warning" in rank0, rank0[:2000]
    png = f"{run}/metrics.png"
    assert f"plot: {png}" in lines, lines[-5:]  # the run's last line names its PNG
    assert read_png(open(png, "rb").read())["width"] > 0
