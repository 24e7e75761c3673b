"""RL checkpoints (megatron_rl.checkpoint.rl): atomic saves, `latest` resolution, bitwise resume.

Unit: only complete ``step_<k>`` directories count (numeric order), half-written ``.tmp-``
directories and directories without ``COMPLETE`` are ignored, pruning keeps the newest ``keep``.

Multirank (the real trainer, world 4: megatron TP2 x PP2 + vLLM TP1 x 4, two launches), PPO so
the checkpoint holds the critic and its Adam state beside the policy's:
1. 4 PPO steps with a save after step 1 and a save after step 3 that is SIGKILLed (whole job)
   after the model/optimizer shards are written. Its metrics for steps 0..3 are the
   uninterrupted reference (a save does not perturb the run: launch 2 would differ otherwise).
2. A new launch resumes: it must pick step_1 (the killed step_3 is not complete), run steps
   2..3, and log exactly the same policy loss, value loss, both grad norms, explained variance,
   rewards and mismatch bits as launch 1. A critic restored without its Adam moments, or not
   at all, changes the value loss and the critic's grad norm of step 2 or 3.
GRPO's bitwise resume after a killed rank is tests/test_restarts.py.
The distributed-optimizer round trip runs in the world-4 conversion launch of
tests/test_checkpoint_multirank.py (test_distributed_optimizer_rl_checkpoint_round_trip).
"""
import json
import os

import pytest

from _launch import REPO, torchrun
from megatron_rl.checkpoint import rl

# every per-step number that does not measure time or memory
COMPARED = ("reward/mean", "reward/std", "reward/min", "reward/max", "response_len/mean", "loss", "pg_loss",
            "grad_norm", "lr", "clip_frac", "tis_weight_mean", "mismatch/abs_mean", "mismatch/abs_max",
            "mismatch/kl_k1", "mismatch/kl_k3", "critic/value_loss", "critic/grad_norm", "critic/clip_frac",
            "critic/explained_var")


def _mk(root, name, complete):
    os.makedirs(root / name)
    if complete:
        (root / name / rl.COMPLETE).write_text("{}")


@pytest.mark.unit
def test_latest_ignores_incomplete_and_prunes(tmp_path):
    assert rl.latest_checkpoint(str(tmp_path / "none")) is None
    for name, complete in [("step_2", True), ("step_10", True), ("step_11", False), ("step_12.tmp-ab12", True),
                           ("step_9", True), ("other", True)]:
        _mk(tmp_path, name, complete)
    assert [s for s, _ in rl.complete_checkpoints(str(tmp_path))] == [2, 9, 10]  # numeric, not lexical
    assert rl.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_10")
    rl._prune(str(tmp_path), keep=2, current=str(tmp_path / "step_10"))
    assert sorted(os.listdir(tmp_path)) == ["other", "step_10", "step_11", "step_9"]


def _same(a, b) -> bool:
    return a == b or (a != a and b != b)  # bitwise-equal floats; nan (no return variance) equals nan


def _rows(path):
    return {r["step"]: r for r in map(json.loads, open(path)) if r}


@pytest.mark.multirank
def test_resume_is_bitwise_and_survives_kill_during_save(tiny_models, tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ["train", "--config", "configs/tiny_cpu.yaml", f"model.hf_path={tiny_models['llama']}", "algorithm.name=ppo",
              "train.steps=4", "algorithm.group_size=4", "data.prompts_per_step=2", "rollout.max_new_tokens=8",
              "checkpoint.save_every=2", f"checkpoint.dir={ckpt}", "checkpoint.keep=2", "logging.progress=false"]
    cli = os.path.join(REPO, "megatron_rl", "cli.py")
    faulty_cli = os.path.join(REPO, "tests", "workers", "ckpt_fault_cli.py")  # cli.py + the fault seam's hook
    p1, _ = torchrun(faulty_cli, nproc=4, out_dir=str(tmp_path / "o1"), timeout=600, check=False,
                     args=common + [f"logging.run_dir={tmp_path / 'run1'}"], env={"MEGATRON_RL_CKPT_FAULT": "3"})
    assert p1.returncode != 0, "the fault hook should have killed the job during the step-3 save"
    left = sorted(os.listdir(ckpt))
    assert left[0] == "step_1" and len(left) == 2 and left[1].startswith("step_3.tmp-"), left
    assert os.listdir(ckpt / left[1] / "dist"), "the kill should come after the shards were written"
    assert rl.latest_checkpoint(str(ckpt)) == str(ckpt / "step_1")
    ref = _rows(tmp_path / "run1" / "metrics.jsonl")
    assert sorted(ref) == [0, 1, 2, 3]

    p2, _ = torchrun(cli, nproc=4, out_dir=str(tmp_path / "o2"), timeout=600,
                     args=common + [f"logging.run_dir={tmp_path / 'run2'}"])
    got = _rows(tmp_path / "run2" / "metrics.jsonl")
    assert sorted(got) == [2, 3]  # a resumed run logs from its resume point on
    for step in (2, 3):
        diff = {k: (ref[step][k], got[step][k]) for k in COMPARED if not _same(ref[step][k], got[step][k])}
        assert not diff, (step, diff)  # exact equality, not a tolerance
    for key in ("grad_norm", "critic/grad_norm", "critic/value_loss"):  # the compared numbers do move between steps
        assert ref[2][key] != ref[3][key], key
    assert all(key in ref[s] for key in COMPARED for s in (2, 3))  # every compared number was logged
    # the resumed run saved step_3 normally and removed the killed save's leftovers
    assert sorted(os.listdir(ckpt)) == ["step_1", "step_3"]
    meta = rl.read_complete(str(ckpt / "step_3"))
    assert meta["step"] == 3 and meta["world_size"] == 4
    saved_cfg = json.load(open(ckpt / "step_3" / "config.json"))
    assert saved_cfg["train"]["steps"] == 4 and saved_cfg["parallel"]["tp"] == 2
    assert sorted(os.listdir(ckpt / "step_3" / "rng")) == [f"rank{r}.pt" for r in range(4)]
    assert os.listdir(ckpt / "step_3" / "critic"), "the critic's shards are part of the checkpoint"
