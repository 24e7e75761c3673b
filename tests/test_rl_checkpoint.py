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
3. Export, on launch 2's checkpoint (no further vLLM launch): launch 2 records vLLM's greedy
   generations (6 prompts x 24 tokens, fp32) after its last sync, from the weights it saves as
   step_3. ``megatron-rl convert rl-to-hf`` (the real CLI: its own torchrun at the training
   layout, 4 ranks) exports the newest step; transformers' greedy ``generate`` from the export
   gives the identical tokens, and its log-probs of them equal vLLM's (< 1e-4). Negative
   control: the untrained source model generates other tokens for every prompt. Exporting again
   into the existing DIR is refused with one line (a failed export: tests/test_export.py).
GRPO's bitwise resume after a killed rank is tests/test_restarts.py.
The distributed-optimizer round trip runs in the world-4 conversion launch of
tests/test_checkpoint_multirank.py (test_distributed_optimizer_rl_checkpoint_round_trip).
"""
import json
import os
import sys

import pytest
import torch

from _launch import REPO, launch_env, run_group, torchrun
from megatron_rl.checkpoint import convert, rl

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


@pytest.fixture(scope="module")
def ppo_runs(tiny_models, tmp_path_factory):
    """Launch 1 (killed in the step-3 save) and launch 2 (resumed; records vLLM's greedy
    generations after its last sync, from the weights it saves as step_3)."""
    tmp = tmp_path_factory.mktemp("rlckpt")
    ckpt = tmp / "ckpt"
    common = ["train", "--config", "configs/tiny_cpu.yaml", f"model.hf_path={tiny_models['llama']}", "algorithm.name=ppo",
              "train.steps=4", "algorithm.group_size=4", "data.prompts_per_step=2", "rollout.max_new_tokens=8",
              "checkpoint.save_every=2", f"checkpoint.dir={ckpt}", "checkpoint.keep=2", "logging.progress=false"]
    faulty_cli = os.path.join(REPO, "tests", "workers", "ckpt_fault_cli.py")  # cli.py + the test seams' hooks
    p1, _ = torchrun(faulty_cli, nproc=4, out_dir=str(tmp / "o1"), timeout=600, check=False,
                     args=common + [f"logging.run_dir={tmp / 'run1'}"], env={"MEGATRON_RL_CKPT_FAULT": "3"})
    after_kill = {"rc": p1.returncode, "left": sorted(os.listdir(ckpt)), "latest": rl.latest_checkpoint(str(ckpt))}
    after_kill["shards"] = os.listdir(ckpt / after_kill["left"][-1] / "dist") if len(after_kill["left"]) > 1 else []
    torchrun(faulty_cli, nproc=4, out_dir=str(tmp / "o2"), timeout=600,
             args=common + [f"logging.run_dir={tmp / 'run2'}"], env={"MEGATRON_RL_GREEDY_PROBE": str(tmp / "greedy.json")})
    return {"tmp": tmp, "ckpt": ckpt, "after_kill": after_kill, "greedy": json.load(open(tmp / "greedy.json"))}


@pytest.mark.multirank
def test_resume_is_bitwise_and_survives_kill_during_save(ppo_runs):
    tmp, ckpt, k = ppo_runs["tmp"], ppo_runs["ckpt"], ppo_runs["after_kill"]
    assert k["rc"] != 0, "the fault hook should have killed the job during the step-3 save"
    left = k["left"]
    assert left[0] == "step_1" and len(left) == 2 and left[1].startswith("step_3.tmp-"), left
    assert k["shards"], "the kill should come after the shards were written"
    assert k["latest"] == str(ckpt / "step_1")
    ref = _rows(tmp / "run1" / "metrics.jsonl")
    assert sorted(ref) == [0, 1, 2, 3]
    got = _rows(tmp / "run2" / "metrics.jsonl")
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
    # what an export needs without the run: the HF source (absolute) and the saved layout
    assert meta["policy"] == {"hf_path": saved_cfg["model"]["hf_path"], "tp": 2, "pp": 2, "vocab_divisible_by": 128,
                              "param_dtype": "float32"}, meta


def _export(src, out):
    """The real CLI, as a user runs it: it validates, launches its own torchrun, publishes."""
    return run_group([sys.executable, "-m", "megatron_rl.cli", "convert", "rl-to-hf", "--src", str(src),
                      "--out", str(out), "--no-progress"], env=launch_env(), timeout=600)


def _greedy(model, prompt: list, n: int) -> list:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def _logprobs(model, prompt: list, tokens: list) -> torch.Tensor:
    """log p(tokens[i] | prompt + tokens[:i]) under ``model``, (len(tokens),)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]  # (T, V)
    return torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.multirank
def test_export_generates_exactly_what_vllm_generated(ppo_runs, tiny_models, capsys):
    """`convert rl-to-hf` of the saved step_3 (PPO, TP2 x PP2, with a critic and Adam state beside
    the policy), loaded by transformers, greedily generates the very tokens that vLLM generated
    from the same weights after the run's last sync (fp32); the untrained source model does not."""
    from transformers import AutoModelForCausalLM  # lazy: only this test loads HF models

    tmp, ckpt, probe = ppo_runs["tmp"], ppo_runs["ckpt"], ppo_runs["greedy"]
    out = tmp / "hf"
    ok = _export(ckpt, out)  # the newest complete step, at its training layout (4 ranks)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= set(os.listdir(out))
    capsys.readouterr()  # again, into the DIR that now exists: refused before any work, one line
    assert convert.main(["rl-to-hf", "--src", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0], err

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    untrained = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    n, lp_moved, tokens_moved = probe["max_new_tokens"], [], []
    for prompt, tokens, vllm_lp in zip(probe["prompts"], probe["tokens"], probe["logprobs"]):
        assert _greedy(exported, prompt, n) == tokens, (prompt, tokens)  # identical tokens, same length
        lp = _logprobs(exported, prompt, tokens)
        assert float((lp - torch.tensor(vllm_lp, dtype=torch.float64)).abs().max()) < 1e-4, (prompt, lp, vllm_lp)
        # negative control: the source model before RL scores (and generates) otherwise
        lp_moved.append(float((_logprobs(untrained, prompt, tokens) - lp).abs().max()))
        tokens_moved.append(_greedy(untrained, prompt, n) != tokens)
    print(f"untrained vs export: max |dlogp| per prompt {lp_moved}, greedy tokens differ {tokens_moved}")
    assert min(lp_moved) > 1e-2 and all(tokens_moved), (lp_moved, tokens_moved)  # measured: >= 0.44, all
    assert len(probe["tokens"]) == 6 and min(map(len, probe["tokens"])) > 0
