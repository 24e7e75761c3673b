"""Tier 2, end to end: `megatron-rl train` runs 3 GRPO steps on CPU at world 4 (megatron-core
TP2 x PP2 with shared-prefix packing, vLLM TP1 x 4 replicas, direct weight sync, release and
resume every step) and writes every metric field; after every sync the rollout's log-probs
equal the trainer's on the same tokens (fp32). It runs with the KL to the frozen reference model
(``algorithm.kl_coef > 0``): the KL is 0 while the policy is still the reference (step 0) and
positive after updates, and the reference's forward is timed as its own phase.

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


def test_train_three_steps(tiny_models, tmp_path):
    run = tmp_path / "run"
    env = launch_env(SKIP_ENV="1", NPROC_PER_NODE="4", CONFIG="configs/tiny_cpu.yaml", MASTER_PORT=str(free_port()),
                     PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    overrides = ["train.steps=3", "checkpoint.dir=null", f"logging.run_dir={run}", f"model.hf_path={tiny_models['llama']}",
                 "algorithm.kl_coef=0.05", f"algorithm.tis_cap={TIS_CAP}"]
    # stderr into stdout: the console as a terminal shows it, in order
    proc = run_group(["bash", "-c", 'exec bash launch/torchrun.sh "$@" 2>&1', "torchrun.sh", *overrides], env=env,
                     timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
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


def _check_console(out: str, *, run: str) -> None:
    lines = out.split("\n")  # not splitlines(): the progress bar's carriage returns are not lines
    first = next(i for i, ln in enumerate(lines) if "step 0: reward" in ln)
    print(f"console: {first} lines before the first step, {len(lines)} in all; they are:\n" + "\n".join(lines[:first]))
    assert first <= 40, "\n".join(lines[:first])
    assert "[default" not in out and "WARNING" not in out and "Warning" not in out, out[:4000]
    # Negative control: the warnings exist; they are in rank 0's own log, not on the console.
    rank0 = "".join(open(p).read() for p in glob.glob(f"{run}/logs/*/*/attempt_0/0/std*.log"))
    assert "WARNING" in rank0 and "Warning" in rank0, rank0[:2000]
    png = f"{run}/metrics.png"
    assert f"plot: {png}" in lines, lines[-5:]  # the run's last line names its PNG
    assert read_png(open(png, "rb").read())["width"] > 0
