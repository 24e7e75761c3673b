"""The quiet console (megatron_rl/console.py) in real child processes, without torch.

A child stands in for a rank under a quiet launch: it writes through Python's stdout and
stderr, through the raw file descriptors (as C++ code does), and as a Python warning, then sends
one message of ours to the console. Captured: the console holds only the node's one-line banner
and our message; the rank's log files hold everything, ours included. Negative controls: without
``MEGATRON_RL_CONSOLE=quiet`` (a verbose or plain launch), and without torchrun's log directory,
nothing is captured and all of it reaches the console.
"""
import os
import subprocess
import sys

import pytest

from _launch import REPO

pytestmark = pytest.mark.process

CHILD = r"""
import os, sys, warnings
from megatron_rl import console
console.capture()
print("python-stdout-chatter")
print("python-stderr-chatter", file=sys.stderr)
os.write(1, b"fd1-chatter\n"); os.write(2, b"fd2-chatter\n")
warnings.warn("library-warning")
sys.stdout.flush(); sys.stderr.flush()
console.say("[rank 0] our message")
print("our stdout line", file=console.stdout(), flush=True)
"""
CHATTER = ("python-stdout-chatter", "python-stderr-chatter", "fd1-chatter", "fd2-chatter", "library-warning")


def _child(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_RL_CONSOLE", "TORCHELASTIC_ERROR_FILE")}
    full.update(PYTHONPATH=REPO, LOCAL_RANK="0", **env)
    return subprocess.run([sys.executable, "-c", CHILD], env=full, capture_output=True, text=True, timeout=60)


def test_quiet_capture_sends_chatter_to_the_rank_log(tmp_path):
    rank_dir = tmp_path / "logs" / "run_x" / "attempt_0" / "0"
    p = _child(tmp_path, MEGATRON_RL_CONSOLE="quiet", TORCHELASTIC_ERROR_FILE=str(rank_dir / "error.json"))
    assert p.returncode == 0, p.stderr
    err, out = p.stderr.splitlines(), p.stdout.splitlines()
    assert out == ["our stdout line"], out
    assert len(err) == 2 and err[0].startswith("[console] rank output") and str(rank_dir.parent) in err[0], err
    assert err[1] == "[rank 0] our message", err
    log_out, log_err = (rank_dir / "stdout.log").read_text(), (rank_dir / "stderr.log").read_text()
    for needle in ("python-stdout-chatter", "fd1-chatter"):
        assert needle in log_out, log_out
    for needle in ("python-stderr-chatter", "fd2-chatter", "library-warning", "[rank 0] our message"):
        assert needle in log_err, log_err


@pytest.mark.parametrize("env", [{"TORCHELASTIC_ERROR_FILE": "LOGDIR"}, {"MEGATRON_RL_CONSOLE": "quiet"}],
                         ids=["not-quiet", "no-log-dir"])
def test_nothing_captured_without_a_quiet_launch(tmp_path, env):
    env = {k: str(tmp_path / "r" / "0" / "error.json") if v == "LOGDIR" else v for k, v in env.items()}
    p = _child(tmp_path, **env)
    assert p.returncode == 0, p.stderr
    console = p.stdout + p.stderr
    for needle in CHATTER + ("[rank 0] our message", "our stdout line"):
        assert needle in console, (needle, console)
    assert "[console]" not in console
    assert not (tmp_path / "r" / "0" / "stderr.log").exists()
