"""Tier 1: ``megatron-rl convert rl-to-hf`` finds the policy of an RL checkpoint and refuses bad
input before any process starts (no processes here).

Which step (the newest complete one, ``--step``, or a ``step_<k>`` directory given as ``--src``),
which HF source (recorded in ``COMPLETE``; from ``config.json`` for a checkpoint saved before
that; ``--hf-config`` overrides) and which layout (the training layout, ``--tp/--pp`` override)
are checked on fake checkpoints; every refusal is one line naming the flag or file and the fix;
a failed export leaves no DIR; an export always carries a generation_config.json.
The export itself, compared with vLLM's generations, is in tests/test_rl_checkpoint.py.
"""
import json
import os

import pytest

from megatron_rl.checkpoint import CheckpointError, convert, rl
from megatron_rl.checkpoint import hf as hfio

pytestmark = pytest.mark.unit


def _step(root, step, *, policy=None, config=None, complete=True, shards=True):
    """An RL checkpoint directory as far as export validation reads it (no tensors)."""
    path = root / f"step_{step}"
    os.makedirs(path / "dist")
    if shards:
        (path / "dist" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if complete:
        (path / rl.COMPLETE).write_text(json.dumps({"step": step, **({"policy": policy} if policy else {})}))
    return path


def _policy(hf, **kw):
    return {"hf_path": hf, "tp": 2, "pp": 2, "vocab_divisible_by": 128, "param_dtype": "float32", **kw}


def _run_bad(argv, capsys, monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("torchrun was launched for a bad input")
    monkeypatch.setattr(convert, "_torchrun", no_launch)
    capsys.readouterr()
    rc = convert.main(["rl-to-hf", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith("error: ") and "; fix: " in err[0], err[0]
    return err[0]


def test_picks_the_newest_complete_step_and_its_recorded_source(tiny_models, tmp_path):
    llama = tiny_models["llama"]
    _step(tmp_path, 2, policy=_policy(llama))
    _step(tmp_path, 10, policy=_policy(llama, tp=1, pp=4))
    _step(tmp_path, 12, policy=_policy(llama), complete=False)  # half-written: never exported
    src = rl.policy_source(str(tmp_path))
    assert (src.step, src.path, src.tp, src.pp, src.hf_dir) == (10, str(tmp_path / "step_10"), 1, 4, llama)
    assert src.dist_dir == str(tmp_path / "step_10" / "dist")  # the policy, never critic/
    assert rl.policy_source(str(tmp_path), step=2).tp == 2
    assert rl.policy_source(str(tmp_path / "step_2")).step == 2  # a step directory itself
    other = str(tmp_path / "elsewhere")
    os.makedirs(other)
    with pytest.raises(CheckpointError, match="--hf-config"):
        rl.policy_source(str(tmp_path), hf_dir=other)
    assert rl.policy_source(str(tmp_path), hf_dir=tiny_models["qwen2"]).hf_dir == tiny_models["qwen2"]


def test_an_older_checkpoint_takes_the_policy_from_its_config(tiny_models, tmp_path):
    cfg = {"model": {"hf_path": tiny_models["llama"], "make_vocab_size_divisible_by": 64, "dtype": "bfloat16"},
           "parallel": {"tp": 2, "pp": 1}}
    _step(tmp_path, 3, config=cfg)  # COMPLETE without "policy"
    src = rl.policy_source(str(tmp_path))
    assert (src.tp, src.pp, src.vocab_divisible_by, src.param_dtype) == (2, 1, 64, "bfloat16")


def test_validation_launches_the_training_layout(tiny_models, tmp_path):
    _step(tmp_path, 5, policy=_policy(tiny_models["llama"]))
    args = convert.parse_args(["rl-to-hf", "--src", str(tmp_path), "--out", str(tmp_path / "hf")])
    info = convert.validate(args)
    assert (info["nproc"], info["step"], info["meta"].param_dtype) == (4, 5, "float32")
    args = convert.parse_args(["rl-to-hf", "--src", str(tmp_path), "--out", str(tmp_path / "hf"), "--tp", "1",
                               "--pp", "1"])
    assert convert.validate(args)["nproc"] == 1  # dist-checkpointing reshards on load


def test_bad_inputs_fail_before_work_with_one_clear_line(tiny_models, tmp_path, capsys, monkeypatch):
    llama = tiny_models["llama"]
    out = str(tmp_path / "hf")
    cases = {"missing": ([str(tmp_path / "nope")], ["--src", "nope: does not exist", "checkpoint.dir"])}
    half = tmp_path / "half"
    _step(half, 3, policy=_policy(llama), complete=False)
    cases["half-written only"] = ([str(half)], ["no complete checkpoint", "step_3", "checkpoint.save_every"])
    good = tmp_path / "good"
    _step(good, 1, policy=_policy(llama))
    cases["no such step"] = ([str(good), "--step", "2"], ["--step 2", "complete steps: [1]", "drop --step"])
    cases["step vs step dir"] = ([str(good / "step_1"), "--step", "2"], ["--step 2", "checkpoint of step 1"])
    noshards = tmp_path / "noshards"
    _step(noshards, 1, policy=_policy(llama), shards=False)
    cases["no shards"] = ([str(noshards)], ["step_1/dist/metadata.json: missing", "--step"])
    gone = tmp_path / "gone"
    _step(gone, 1, policy=_policy(str(tmp_path / "moved-away")))
    cases["source gone"] = ([str(gone)], ["moved-away/config.json: missing", "--hf-config DIR"])
    old = tmp_path / "old"
    _step(old, 1)  # neither COMPLETE's policy nor a config.json
    cases["old, no config"] = ([str(old)], ["records no policy", "config.json"])
    corrupt = tmp_path / "corrupt"
    (_step(corrupt, 1, policy=_policy(llama)) / rl.COMPLETE).write_text("{not json")
    cases["corrupt marker"] = ([str(corrupt)], ["step_1/COMPLETE: corrupt", "--step"])
    cases["corrupt marker, step dir"] = ([str(corrupt / "step_1")], ["step_1/COMPLETE: corrupt"])
    cases["tp"] = ([str(good), "--tp", "3"], ["--tp 3"])
    cases["bucket"] = ([str(good), "--bucket-bytes", "100"], ["--bucket-bytes 100", "smaller than one row"])
    for name, (argv, needles) in cases.items():
        line = _run_bad(["--src", *argv[:1], "--out", out, *argv[1:]], capsys, monkeypatch)
        for needle in needles:
            assert needle in line, f"{name}: {needle!r} not in {line!r}"
        assert not os.path.exists(out), name
    os.makedirs(out)
    line = _run_bad(["--src", str(good), "--out", out], capsys, monkeypatch)
    assert "already exists" in line and "--overwrite" in line, line


def test_a_failed_export_leaves_no_output_and_a_finished_one_is_published(tiny_models, tmp_path, capsys,
                                                                          monkeypatch):
    """The launching parent owns the temporary DIR: its ranks die after writing tensors (rc -9, as
    torchrun reports a SIGKILLed rank) -> no DIR, no temporary; they finish -> DIR holds it all."""
    _step(tmp_path / "ckpt", 4, policy=_policy(tiny_models["llama"]))
    out, seen = tmp_path / "hf", {}

    def ranks(rc):
        def run(argv, nproc):
            tmp = argv[argv.index("--_tmp") + 1]
            seen.update(argv=argv, nproc=nproc)
            with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
                f.write(b"tensors")  # what a rank wrote
            return rc
        return run

    argv = ["rl-to-hf", "--src", str(tmp_path / "ckpt"), "--out", str(out)]
    monkeypatch.setattr(convert, "_torchrun", ranks(-9))
    assert convert.main(argv) == -9
    assert f"no output written to {out}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no DIR, no hidden temporary
    assert seen["nproc"] == 4 and seen["argv"][-4:-2] == ["--step", "4"]  # the training layout; the step validated
    monkeypatch.setattr(convert, "_torchrun", ranks(0))
    assert convert.main(argv) == 0
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"] and os.listdir(out) == ["model.safetensors"]


def test_an_export_always_has_a_generation_config(tiny_models, tmp_path):
    src = tiny_models["llama"]
    d = tmp_path / "hf"
    os.makedirs(d)
    for name in ("config.json", "tokenizer.json"):
        (d / name).write_bytes(open(os.path.join(src, name), "rb").read())
    assert hfio.ensure_generation_config(str(d)) is True
    gen, cfg = json.load(open(d / "generation_config.json")), json.load(open(d / "config.json"))
    assert gen["eos_token_id"] == cfg["eos_token_id"] and gen["bos_token_id"] == cfg["bos_token_id"]
    assert hfio.ensure_generation_config(str(d)) is False  # one that exists is kept (the source's)
