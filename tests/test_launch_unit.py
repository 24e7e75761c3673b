"""megatron_rl.runtime without torchrun: root-cause verdicts, classification, version checks,
launch checks, and the watchdog / SIGTERM path of RankRuntime in a child process."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from _launch import REPO, free_port
from megatron_rl.runtime import launch_check
from megatron_rl.runtime.preflight import version_mismatches
from megatron_rl.runtime.records import classify, root_cause
from megatron_rl.runtime.report import format_report


def _st(rank, state, phase="train"):
    return {"rank": rank, "host": f"h{rank // 2}", "pid": 100 + rank, "state": state, "phase": phase}


def _fail(rank, kind, t, error="RuntimeError: boom", phase="train"):
    return {"rank": rank, "host": f"h{rank // 2}", "pid": 100 + rank, "kind": kind, "time": t, "error": error,
            "phase": phase}


@pytest.mark.unit
def test_root_cause_prefers_the_cause_over_its_consequences():
    lost = [_fail(0, "peer_lost", 1.0, "RuntimeError: Connection closed by peer"), _fail(2, "peer_lost", 1.1)]
    # An exception on rank 3, recorded after the peers already saw broken connections.
    head, details = root_cause({"status": [], "failures": lost + [_fail(3, "exception", 2.0, phase="rollout")]})
    assert head.startswith("rank 3 (host h1, pid 103) raised in phase 'rollout': RuntimeError: boom"), head
    assert details == ["then ranks 0,2 stopped because a peer was lost (consequence, not cause)"]
    # A rank killed by SIGKILL leaves only its 'running' status; the survivors failed or were terminated.
    status = [_st(0, "failed"), _st(1, "running", "sync"), _st(2, "terminated"), _st(3, "failed")]
    head, _ = root_cause({"status": status, "failures": lost})
    assert head.startswith("rank 1 (host h0, pid 101) died in phase 'sync' without a Python exception"), head
    # Same error on every rank (preflight): one headline, the rest folded into one line.
    same = [_fail(r, "exception", 1.0 + r, "PreflightError: x") for r in range(4)]
    head, details = root_cause({"status": [], "failures": same})
    assert head.startswith("rank 0 ") and details == ["also: ranks 1,2,3 failed with the same error"]
    # Only consequences: say so, name the first.
    head, _ = root_cause({"status": [_st(0, "failed")], "failures": lost})
    assert head.startswith("rank 0 (host h0, pid 100) lost a peer in phase 'train'"), head
    assert root_cause({"status": [_st(r, "done") for r in range(4)], "failures": []}) is None


@pytest.mark.unit
def test_classify_and_report_text(tmp_path):
    assert classify(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:9929")) == "peer_lost"
    assert classify(RuntimeError("Timed out waiting 30000ms for recv operation to complete")) == "peer_lost"
    assert classify(ValueError("bad shape (3, 4)")) == "exception"
    text = format_report(str(tmp_path), exit_code=1)
    assert text.splitlines()[1].startswith("FIRST FAILURE: no rank recorded a failure; torchrun exited 1")
    text = format_report(str(tmp_path), exit_code=1, rendezvous="10.0.0.1:29500", nnodes="2", rdzv_timeout="5")
    assert text.splitlines()[1].startswith("FIRST FAILURE: no rank started: the rendezvous at 10.0.0.1:29500 did "
                                           "not gather NNODES=2 node(s) within RDZV_TIMEOUT=5 s")


@pytest.mark.unit
def test_version_mismatches_name_package_hosts_and_ranks():
    v = {"torch": "2.13.0", "transformers": "5.19.0"}
    infos = [{"rank": r, "host": f"n{r // 2}", "versions": dict(v)} for r in range(4)]
    assert version_mismatches(infos) == []
    infos[3]["versions"]["transformers"] = "5.18.0"
    assert version_mismatches(infos) == ["transformers: 5.18.0 on n1 (ranks 3) vs 5.19.0 on n0,n1 (ranks 0,1,2)"]


@pytest.mark.unit
def test_launch_check_lines(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"parallel: {{world_size: 4}}\nlogging: {{run_dir: {tmp_path}/run}}\n")
    ok = launch_check.main(["--config", str(cfg), "--nnodes", "1", "--nproc-per-node", "4",
                           "--master-port", str(free_port())])
    assert ok == 0 and capsys.readouterr().out.splitlines() == [f"{tmp_path}/run", "1", "0"]
    assert launch_check.main(["--config", str(cfg), "--nnodes", "1", "--nproc-per-node", "4", "--no-endpoint",
                              "--", "logging.verbose=true"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path}/run", "1", "1"]
    for argv, needle in [
        (["--nnodes", "1:2", "--nproc-per-node", "4"], "NNODES='1:2' must be a positive integer"),
        (["--nnodes", "2", "--nproc-per-node", "4"], "NPROC_PER_NODE=4 x NNODES=2 = 8 ranks"),
        (["--nnodes", "2", "--nproc-per-node", "2", "--node-rank", "2"], "NODE_RANK='2' must be in 0..1"),
    ]:
        assert launch_check.main(["--config", str(cfg), *argv]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("launch error: ") and needle in err[0], err


_CHILD = textwrap.dedent("""
    import sys, time
    from megatron_rl.runtime import RankRuntime
    rt = RankRuntime(sys.argv[1], timeout_s=float(sys.argv[2]), rank=5, world_size=8).start()
    with rt.phase("warmup"):
        pass
    with rt.phase("train"):
        print("in-phase", flush=True)
        time.sleep(30)
""")


def _child(tmp_path, timeout_s):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), str(timeout_s)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.multirank
def test_watchdog_fails_a_hung_phase_and_sigterm_is_recorded(tmp_path):
    # A phase that outlives its timeout: recorded as a hang, stacks dumped, exit 3.
    t0 = time.monotonic()
    p = _child(tmp_path / "hang", 1.0)
    out, err = p.communicate(timeout=60)
    took = time.monotonic() - t0
    rec = json.load(open(tmp_path / "hang" / "runtime" / "failures" / "rank5.json"))
    assert p.returncode == 3 and rec["kind"] == "hang" and rec["phase"] == "train", (p.returncode, rec, err)
    assert "phase 'train' exceeded its 1 s timeout" in rec["error"] and 'File "<string>", line 9 in <module>' in err, err
    assert took < 25, took
    # SIGTERM from the launcher while the main thread sleeps: recorded as terminated at once.
    p = _child(tmp_path / "term", 60.0)
    assert p.stdout.readline().strip() == "in-phase"
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=30)
    status = json.load(open(tmp_path / "term" / "runtime" / "ranks" / "rank5.json"))
    assert rc == 128 + signal.SIGTERM and status["state"] == "terminated" and status["phase"] == "train", status
    assert time.monotonic() - t0 < 10
