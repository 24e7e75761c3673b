"""A job that survives a dead rank: MAX_RESTARTS in launch/torchrun.sh, resume, one restart line.

Unit: the previous attempt's records are archived per rank and name the rank that died (the
structured cause and the restart line); the resource sampler counts exactly what this process
opens; no sampling key without the env var.

Multirank (the real trainer, world 4, tiny demo, two launches of launch/torchrun.sh):
1. MAX_RESTARTS=1, 4 steps, a checkpoint every 2 steps (after steps 1 and 3); the test hook
   SIGKILLs rank 1 on entering "train" of step 3 in the first attempt. torchrun restarts every
   rank; they resume from step_1 and the launch exits 0 with one "[restart]" line naming rank 1,
   phase 'train', step 3 and the resume step.
2. The resumed step 2 equals, bitwise, the step 2 the first attempt ran before the kill (kept in
   metrics.replaced.jsonl): the model, optimizer, RNG and data position came back exactly.
   (Bitwise resume over several steps, critic included, is tests/test_rl_checkpoint.py's.)
"""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from _launch import LAUNCHES, REPO, free_port
from megatron_rl.metrics import read_metrics, resource_usage
from megatron_rl.runtime import records
from megatron_rl.runtime.rank import FAULT_ENV, RankRuntime
from megatron_rl.runtime.report import format_report, restart_line
from megatron_rl.runtime.resources import ENV as SAMPLE_ENV, resource_metrics

sys.path.insert(0, os.path.join(REPO, "tests", "workers"))
from launch_hosts import kill_tree  # noqa: E402

LAUNCH = os.path.join(REPO, "launch", "torchrun.sh")
LAUNCH_TIMEOUT_S = 600  # per launch; idle 2 cores: see the wall times this test prints
# every per-step number that does not measure time or memory
COMPARED = ("reward/mean", "reward/std", "reward/min", "reward/max", "response_len/mean", "loss", "pg_loss",
            "grad_norm", "lr", "clip_frac", "tis_weight_mean", "mismatch/abs_mean", "mismatch/abs_max",
            "mismatch/kl_k1", "mismatch/kl_k3")


def _attempt0(tmp_path, monkeypatch):
    """Four ranks of a first attempt: rank 1 was SIGKILLed in train at step 3, the others terminated."""
    run = str(tmp_path)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    for r in range(4):
        rt = RankRuntime(run, timeout_s=30, rank=r, world_size=4)
        rt.step, rt._phase = 3, "train"
        rt._status("running" if r == 1 else "terminated")
    return run


@pytest.mark.unit
def test_restart_archives_records_and_names_the_dead_rank(tmp_path, monkeypatch):
    run = _attempt0(tmp_path, monkeypatch)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    rts = [RankRuntime(run, timeout_s=30, rank=r, world_size=4) for r in range(4)]
    for r in (0, 2, 3, 1):  # start() archives first, then writes this attempt's status
        records.archive_attempt(run, r, attempt=rts[r].attempt - 1)
        rts[r]._status("running")
    old = records.load_records(run, attempt=0)
    assert [(s["rank"], s["state"], s["step"]) for s in old["status"]] == [
        (0, "terminated", 3), (1, "running", 3), (2, "terminated", 3), (3, "terminated", 3)]
    assert all(s["attempt"] == 1 for s in records.load_records(run)["status"])  # the new attempt's own
    cause = records.first_cause(old)
    assert (cause["rank"], cause["phase"], cause["step"]) == (1, "train", 3) and "SIGKILL" in cause["how"]
    line = restart_line(run, attempt=1, max_restarts="1", resumed=2)
    assert line.startswith("[restart] restart 1 of 1: rank 1 (host ") and "phase 'train' at step 3" in line, line
    assert line.endswith("resumed from the checkpoint of step 1, next step 2"), line
    assert restart_line(run, attempt=1, max_restarts="1", resumed=0).endswith("started again at step 0")
    # should the restarted attempt fail too, the failure report also names the earlier attempt
    report = format_report(run, exit_code=1)
    assert "earlier attempt 0 (then restarted): rank 1 died without a Python exception" in report, report
    assert "phase 'train' at step 3" in report and "earlier attempt 1" not in report, report
    # negative control: a raise beats a vanished rank, and no records at all says so
    records.write_json(records.failure_path(run, 3), {"rank": 3, "kind": "exception", "time": 1.0, "phase": "sync",
                                                      "error": "RuntimeError: x", "step": 4})
    assert records.first_cause(records.load_records(run))["rank"] == 3
    assert "left no failure record" in restart_line(run, attempt=5, max_restarts="9", resumed=0)


def _shm_segment(name: str, *, keep_fd: bool):
    """A /dev/shm segment held open (an fd, no mapping), or only mapped (libc mmap; fd closed).
    Returns the fd, or a function that unmaps it."""
    import ctypes
    import mmap

    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 1 << 16)
    if keep_fd:
        return fd
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                             ctypes.c_int, ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, 1 << 16, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    return lambda: libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(1 << 16))


@pytest.mark.unit
def test_resource_usage_counts_what_the_process_holds(monkeypatch):
    base = resource_usage()
    names = [f"mrl-test-{os.getpid()}-{i}" for i in range(2)]
    fd = os.open(os.devnull, os.O_RDONLY)
    seg_fd = _shm_segment(names[0], keep_fd=True)
    unmap = _shm_segment(names[1], keep_fd=False)
    stop = threading.Event()
    th = threading.Thread(target=stop.wait)
    th.start()
    try:
        held = resource_usage()
    finally:
        stop.set()
        th.join()
        os.close(fd)
        os.close(seg_fd)
        unmap()
        for n in names:
            os.unlink(f"/dev/shm/{n}")
    # fds: devnull and the open segment; shm: the open one (fd) and the mapped one (maps only)
    assert (held["fds"] - base["fds"], held["threads"] - base["threads"], held["shm"] - base["shm"]) == (2, 1, 2)
    after = resource_usage()
    assert (after["fds"], after["threads"], after["shm"]) == (base["fds"], base["threads"], base["shm"])
    assert held["rss_mib"] > 50  # this interpreter with torch imported
    monkeypatch.delenv(SAMPLE_ENV, raising=False)
    assert resource_metrics() == {}  # off by default: no key, no collective
    monkeypatch.setenv(SAMPLE_ENV, "1")
    got = resource_metrics()  # no process group: this process only, as rank 0
    assert sorted(got) == ["res/fds/rank0", "res/rss_mib/rank0", "res/shm/rank0", "res/threads/rank0"]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""), "SKIP_ENV": "1",
                "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "4",
                "CONFIG": "configs/tiny_cpu.yaml", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TORCHINDUCTOR_CACHE_DIR": env.get("TORCHINDUCTOR_CACHE_DIR", os.path.join(REPO, "runs", ".cache",
                                                                                         "inductor")),
                "VLLM_CACHE_ROOT": env.get("VLLM_CACHE_ROOT", os.path.join(REPO, "runs", ".cache", "vllm"))})
    env.pop(FAULT_ENV, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(tmp_path, name, overrides, *, timeout, **env):
    t0 = time.monotonic()
    with open(tmp_path / f"{name}.log", "w") as f:
        proc = subprocess.Popen(["bash", LAUNCH, *overrides, f"logging.run_dir={tmp_path / name}",
                                 f"checkpoint.dir={tmp_path / name / 'ckpt'}"], cwd=REPO, env=_env(**env),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_tree(proc.pid)
    assert rc is not None, f"{name}: timed out after {timeout} s:\n{(tmp_path / f'{name}.log').read_text()[-4000:]}"
    took = time.monotonic() - t0
    LAUNCHES.append((f"restarts:{name}", took, timeout))  # printed with the suite's launch margins
    print(f"[{name}] exit {rc} in {took:.1f} s")
    return rc, (tmp_path / f"{name}.log").read_text(), took


@pytest.mark.multirank
@pytest.mark.slow
def test_a_killed_rank_restarts_and_resumes_bitwise(tiny_models, tmp_path):
    common = [f"model.hf_path={tiny_models['llama']}", "train.steps=4", "algorithm.group_size=4",
              "data.prompts_per_step=2", "rollout.max_new_tokens=8", "checkpoint.save_every=2", "checkpoint.keep=2",
              "logging.progress=false", "logging.phase_table=false"]
    rc, text, took = _launch(tmp_path, "killed", common, timeout=LAUNCH_TIMEOUT_S, MAX_RESTARTS=1, **{FAULT_ENV: "3:train:1"})
    assert rc == 0, text[-4000:]
    run = tmp_path / "killed"
    # the kill happened where asked: rank 1 of attempt 0 never left "train" of step 3
    dead = records.load_records(str(run), attempt=0)["status"][1]
    assert (dead["state"], dead["phase"], dead["step"], dead["attempt"]) == ("running", "train", 3, 0), dead
    lines = [ln for ln in text.splitlines() if "[restart]" in ln]
    assert len(lines) == 1, text[-4000:]
    assert (f"restart 1 of 1: rank 1 (host {dead['host']}, pid {dead['pid']}) died without a Python exception"
            in lines[0] and "in phase 'train' at step 3" in lines[0]), lines
    assert lines[0].endswith("resumed from the checkpoint of step 1, next step 2"), lines
    assert "FIRST FAILURE" not in text
    assert all(s["attempt"] == 1 and s["state"] == "done" for s in records.load_records(str(run))["status"])
    got = {r["step"]: r for r in read_metrics(str(run / "metrics.jsonl"))}
    assert sorted(got) == list(range(4)), sorted(got)  # each step once: the resumed run replaced 2..
    replaced = {r["step"]: r for r in read_metrics(str(run / "metrics.replaced.jsonl"))}
    assert sorted(replaced) == [2], sorted(replaced)  # the first attempt logged step 2, then died in step 3
    diff = {k: (replaced[2][k], got[2][k]) for k in COMPARED if replaced[2][k] != got[2][k]}
    assert not diff, diff  # exact equality, not a tolerance
    assert len({got[s]["grad_norm"] for s in range(4)}) == 4  # the compared numbers do move
    print(json.dumps({"killed_run_s": round(took, 1)}))


_CHILD = """
import sys
from megatron_rl.runtime.rank import RankRuntime
rt = RankRuntime(sys.argv[1], timeout_s=30, rank=5, world_size=8).start()
for step in range(4):
    rt.step = step
    for phase in ("rollout", "train", "sync"):
        with rt.phase(phase):
            print(step, phase, flush=True)
rt.finish()
"""


@pytest.mark.multirank
def test_fault_hook_kills_one_phase_of_one_step_in_the_first_attempt_only(tmp_path):
    import signal

    def child(attempt: str, fault: str):
        env = dict(os.environ, PYTHONPATH=REPO, TORCHELASTIC_RESTART_COUNT=attempt, **{FAULT_ENV: fault})
        return subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / attempt)], env=env, capture_output=True,
                              text=True, timeout=60)

    p = child("0", "2:sync:5")
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    assert p.stdout.splitlines()[-1] == "2 train"  # died on entering sync of step 2, nothing after
    st = records.load_records(str(tmp_path / "0"))["status"][0]
    assert (st["state"], st["phase"], st["step"]) == ("running", "sync", 2), st
    for attempt, fault in (("1", "2:sync:5"), ("0", "2:sync:4")):  # a restarted attempt; another rank
        p = child(attempt, fault)
        assert p.returncode == 0 and len(p.stdout.splitlines()) == 12, (attempt, fault, p.returncode, p.stderr[-2000:])
