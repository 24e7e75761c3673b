"""launch/torchrun.sh on one node: fault tests (world 4) and bad launches.

Faults: kill -9 of one rank during "train", the same during "sync", an exception on one
rank in "rollout". Each must end the whole launch non-zero within 60 s, print the failing
rank and phase once (the FIRST FAILURE block), leave every rank's log and no process.
The console is quiet: no torchrun ``[default0]:`` prefixes; a rank that raises prints its
``[rank N] FAILED in phase ...`` line there itself, before the report, its traceback only in its log.
Bad launches: each gets exactly one error line, before torchrun starts.
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from _launch import REPO, free_port

sys.path.insert(0, os.path.join(REPO, "tests", "workers"))
from launch_hosts import kill_tree  # noqa: E402

pytestmark = pytest.mark.multirank
LAUNCH = os.path.join(REPO, "launch", "torchrun.sh")
WORKER = os.path.join(REPO, "tests", "workers", "launch_worker.py")
DEADLINE_S = 60.0


def launch_env(**extra) -> dict:
    """Environment for launch/torchrun.sh: this interpreter's venv, no env.sh refresh."""
    env = dict(os.environ)
    env.update({"PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""), "SKIP_ENV": "1",
                "OMP_NUM_THREADS": "1", "JOB": WORKER, "MASTER_PORT": str(free_port())})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def write_config(tmp_path, *, world=4, timeout_s=30, steps=3, hf_path=None, **parallel) -> tuple:
    run_dir = tmp_path / "run"
    par = {"world_size": world, "timeout_s": timeout_s, **parallel}
    cfg = {"parallel": par, "train": {"steps": steps, "lr": 0.1}, "logging": {"run_dir": str(run_dir)}}
    if hf_path:
        cfg["model"] = {"hf_path": hf_path}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path), str(run_dir)


def statuses(run_dir: str) -> list:
    d = os.path.join(run_dir, "runtime", "ranks")
    # rank<r>.json only, as the report reads them: a rank killed mid-write leaves its atomic write's
    # temporary (rank<r>.json.<pid>.tmp) beside its last complete record
    return [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))
            if f.startswith("rank") and f.endswith(".json")] if os.path.isdir(d) else []


def leftover(pids, marker: str) -> list:
    """Processes still alive: the given pids, or any whose command line mentions ``marker``."""
    time.sleep(0.5)  # the launcher has exited; give the kernel a moment to reap
    alive = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] in pids or marker in cmd:
            alive.append(f"{p.info['pid']}: {cmd[:120]}")
    return alive


FAULTS = [("stall", "train", 1), ("stall", "sync", 2), ("raise", "rollout", 3)]


@pytest.mark.parametrize("what,phase,rank", FAULTS, ids=["kill9-train", "kill9-sync", "raise-rollout"])
def test_fault_fails_fast_and_names_rank_and_phase(tmp_path, what, phase, rank):
    cfg, run_dir = write_config(tmp_path)
    out_dir, log = tmp_path / "out", tmp_path / "console.log"
    out_dir.mkdir()
    env = launch_env(CONFIG=cfg, NPROC_PER_NODE=4, OUT_DIR=out_dir, FAULT=f"{what}:{phase}:{rank}")
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", LAUNCH], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        victim = out_dir / "victim.json"
        if what == "stall":
            deadline = time.monotonic() + 120
            while not victim.exists():
                assert proc.poll() is None and time.monotonic() < deadline, f"no victim:\n{log.read_text()[-3000:]}"
                time.sleep(0.1)
            vpid = json.loads(victim.read_text())["pid"]
            t_fault = time.time()
            os.kill(vpid, signal.SIGKILL)
        rc = proc.wait(timeout=150)
        t_end = time.time()
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    text = log.read_text()
    sts = statuses(run_dir)
    if what == "raise":
        t_fault = json.load(open(os.path.join(run_dir, "runtime", "failures", f"rank{rank}.json")))["time"]
    detect_s = t_end - t_fault
    print(f"[{what}:{phase}:{rank}] launch exit {rc} {detect_s:.2f} s after the fault")

    assert rc != 0, text[-3000:]
    assert detect_s < DEADLINE_S, f"took {detect_s:.1f} s"
    assert text.count("FIRST FAILURE:") == 1, text[-4000:]
    head = next(ln for ln in text.splitlines() if ln.startswith("FIRST FAILURE:"))
    assert f"rank {rank} " in head and f"phase '{phase}'" in head, head
    if what == "raise":
        assert "RuntimeError: injected fault on rank 3 in rollout" in head, head
        # The failing rank said so on the console itself, at once: before torchrun's teardown and the report.
        said = [i for i, ln in enumerate(text.splitlines()) if ln.startswith(f"[rank {rank}] FAILED in phase '{phase}'")]
        assert len(said) == 1 and "injected fault" in text.splitlines()[said[0]], text[-3000:]
        assert said[0] < text.splitlines().index(head), text[-3000:]
        assert 'raise RuntimeError(f"injected fault' not in text  # its traceback is in its log (below), not here
    else:
        assert "without a Python exception" in head and f"pid {vpid}" in head, head
    assert "[default" not in text, text[-4000:]  # a quiet console: no torchrun prefixes
    # Every rank recorded itself; the victim is the only one that never reached an end state.
    assert [s["rank"] for s in sts] == [0, 1, 2, 3]
    states = {s["rank"]: s["state"] for s in sts}
    assert states[rank] == ("running" if what == "stall" else "failed"), states
    assert all(states[r] in ("failed", "terminated") for r in states if r != rank), states
    # Each rank's log is kept; the failing rank's stderr is named in the report.
    for s in sts:
        assert os.path.isfile(s["logs"]["stderr"]) and os.path.isfile(s["logs"]["stdout"]), s
    assert f"rank {rank} log: {sts[rank]['logs']['stderr']}" in text
    if what == "raise":
        assert "injected fault" in open(sts[rank]["logs"]["stderr"]).read()
    assert os.path.isfile(os.path.join(run_dir, "runtime", "FAILURE.txt"))
    # No process left: no rank, no torchrun agent, nothing mentioning this config.
    left = leftover({s["pid"] for s in sts} | {proc.pid}, cfg)
    for entry in left:
        kill_tree(int(entry.split(":")[0]))
    assert left == []


def _bad_launch(tmp_path, **env):
    t0 = time.monotonic()
    p = subprocess.run(["bash", LAUNCH], cwd=REPO, env=launch_env(**env), capture_output=True, text=True, timeout=90)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    return p.returncode, lines, time.monotonic() - t0


def test_bad_launches_get_one_clear_line(tmp_path):
    cfg, _ = write_config(tmp_path, world=4)
    cases = []
    # 1. NPROC_PER_NODE x NNODES != the config's world size.
    rc, lines, _ = _bad_launch(tmp_path, CONFIG=cfg, NPROC_PER_NODE=3)
    cases.append(("world", rc, lines))
    assert "NPROC_PER_NODE=3 x NNODES=1 = 3 ranks" in lines[0] and "parallel.world_size" in lines[0], lines
    # ...and against the degrees when the config has no world size: tp=3 cannot divide 4 ranks.
    (tmp_path / "tp").mkdir()
    cfg_tp, _ = write_config(tmp_path / "tp", world=None, tp=3)
    rc, lines, _ = _bad_launch(tmp_path, CONFIG=cfg_tp, NPROC_PER_NODE=2, NNODES=2, NODE_RANK=0)
    cases.append(("degrees", rc, lines))
    assert "= 4 ranks" in lines[0] and "parallel.tp/pp/cp" in lines[0], lines
    # 2. A missing config file.
    rc, lines, _ = _bad_launch(tmp_path, CONFIG=str(tmp_path / "nope.yaml"))
    cases.append(("config", rc, lines))
    assert "CONFIG=" in lines[0] and "nope.yaml" in lines[0] and "does not exist" in lines[0], lines
    # 3. An unreachable MASTER_ADDR: a bounded wait (RDZV_TIMEOUT), then the error.
    rc, lines, took = _bad_launch(tmp_path, CONFIG=cfg, NNODES=2, NPROC_PER_NODE=2, NODE_RANK=1,
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), RDZV_TIMEOUT=3)
    cases.append(("unreachable", rc, lines))
    print(f"unreachable MASTER_ADDR reported after {took:.1f} s (RDZV_TIMEOUT=3)")
    assert 3.0 <= took < 20.0, took
    assert "MASTER_ADDR:MASTER_PORT=127.0.0.1:" in lines[0] and "unreachable after 3 s" in lines[0], lines
    # ...and node 0 told to host the rendezvous on an address that is not its own (no packet sent).
    rc, lines, _ = _bad_launch(tmp_path, CONFIG=cfg, NNODES=2, NPROC_PER_NODE=2, NODE_RANK=0,
                               MASTER_ADDR="10.231.254.254")
    cases.append(("foreign", rc, lines))
    assert "is not an address of this node" in lines[0], lines
    for name, rc, lines in cases:
        assert rc == 2, (name, rc, lines)
        assert len(lines) == 1 and lines[0].startswith("launch error: ") and "fix:" in lines[0], (name, lines)
