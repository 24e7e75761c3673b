"""Checkpoint tests that spawn a process (marker ``process``, not ``unit``): the conversion
script's --help from a fresh interpreter, and a real SIGKILL in the middle of a write, which
must leave no output directory, only a hidden temporary that the next run removes."""
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_rl.checkpoint import CheckpointError
from megatron_rl.checkpoint import hf as hfio
from megatron_rl.checkpoint import publish

pytestmark = pytest.mark.process
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tiny_models):
    return {"llama": tiny_models["llama"]}


def test_script_help_lists_modes():
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "reshard", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--tp" in r.stdout and "--src" in r.stdout


def test_sigkill_mid_write_leaves_no_output_and_next_run_succeeds(models, tmp_path):
    out = str(tmp_path / "killed")
    worker = os.path.join(REPO, "tests", "workers", "ckpt_kill.py")
    src = os.path.join(models["llama"], "model.safetensors")
    proc = subprocess.Popen([sys.executable, worker, src, out], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert proc.stdout.readline().strip() == "WRITING"  # the worker has written some tensors
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = [p for p in os.listdir(tmp_path) if p.startswith(".killed.partial-")]
    assert not os.path.exists(out) and len(partial) == 1  # only a hidden temporary sibling remains
    assert os.path.getsize(os.path.join(tmp_path, partial[0], "model.safetensors")) > 0
    with pytest.raises(CheckpointError):
        hfio.open_hf(os.path.join(tmp_path, partial[0]))  # it really is half-written
    # The next run into the same output succeeds and removes the dead run's temporary directory.
    ckpt = hfio.open_hf(models["llama"])
    with publish.atomic_dir(out) as tmp:
        with hfio.SafetensorsStreamWriter(tmp, shapes=ckpt.shape.canonical_shapes(), dtype=ckpt.dtype) as w:
            for name in w.names:
                w.write(name, ckpt.tensor(name))
        hfio.copy_hf_extras(ckpt.path, tmp)
    assert sorted(os.listdir(tmp_path)) == ["killed"]
    assert hfio.open_hf(out).shape == ckpt.shape
