"""Helpers for multi-rank tests: build tiny models once, launch torchrun, collect results.

A worker script (tests/workers/*.py) runs under torchrun, checks many cases in one launch,
and writes one JSON per rank to ``$OUT_DIR/rank{r}.json``; the test asserts on those
numbers in the parent process, so every failure message carries the figures.
"""
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CACHE = os.path.join(REPO, "runs", ".test-models")
VARIANTS = {
    "llama": ("llama", False), "llama-tied": ("llama", True),
    "qwen2": ("qwen2", True), "qwen2-untied": ("qwen2", False),
    "qwen3": ("qwen3", False), "qwen3-tied": ("qwen3", True),
    "qwen3-moe": ("qwen3_moe", False),
}


def tiny_model_paths() -> dict:
    sys.path.insert(0, REPO)
    from megatron_rl.models.tiny import make_tiny_model

    import fcntl

    os.makedirs(MODEL_CACHE, exist_ok=True)
    paths = {}
    # One builder at a time (pytest-xdist, concurrent sessions); make_tiny_model renames atomically.
    with open(os.path.join(MODEL_CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, (family, tied) in VARIANTS.items():
            path = os.path.join(MODEL_CACHE, name)
            if not os.path.isfile(os.path.join(path, "config.json")):
                make_tiny_model(path, family=family, tied=tied, seed=0)
            paths[name] = path
    return paths


LAUNCHES: list = []  # (name, wall seconds, timeout seconds) of every launch, printed by conftest


def skip_or_fail(reason: str) -> None:
    """Skip a test whose environment is missing, except under ``CI=true``: there it must run,
    so a missing capability fails it (a green CI never hides a test that did not run)."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: this test must run, but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra) -> dict:
    """The environment of every local torchrun launch (tests and benchmarks): this checkout on
    PYTHONPATH, vLLM in-process with unbound threads, caches under ``runs/.cache`` unless set,
    no model hub; ``extra`` entries last."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "TORCHINDUCTOR_CACHE_DIR": env.get("TORCHINDUCTOR_CACHE_DIR",
                                                   os.path.join(REPO, "runs", ".cache", "inductor")),
                "VLLM_CACHE_ROOT": env.get("VLLM_CACHE_ROOT", os.path.join(REPO, "runs", ".cache", "vllm")),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, script: str, *args: str) -> list:
    """``python -m torch.distributed.run`` with ``nproc`` local ranks on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, *args]


def torchrun(script: str, *, nproc: int, out_dir: str, args=(), timeout: float = 600, env=None,
             check: bool = True):
    """Run ``script`` under torchrun with ``nproc`` local ranks; return (proc, [per-rank json]).

    The whole launch is bounded by ``timeout`` seconds; nothing may hang.
    """
    os.makedirs(out_dir, exist_ok=True)
    full_env = launch_env(OUT_DIR=out_dir, **(env or {}))
    for attempt in range(3):
        cmd = torchrun_cmd(nproc, script, *map(str, args))
        proc = run_group(cmd, env=full_env, timeout=timeout)
        # free_port() releases the port before torchrun binds it: another launch may win the race.
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stderr + proc.stdout:
            break
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).splitlines()[-80:])
        raise AssertionError(f"torchrun {os.path.basename(script)} x{nproc} exited {proc.returncode}:\n{tail}")
    results = []
    for r in range(nproc):
        path = os.path.join(out_dir, f"rank{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else None)
    return proc, results


def run_job(cmd, *, env, timeout: float, what: str) -> float:
    """Benchmarks: run one torchrun job; on failure print its last 40 lines and exit naming
    ``what``. Returns the wall seconds."""
    import time

    t0 = time.time()
    proc = run_group(cmd, env=env, timeout=timeout)
    if proc.returncode != 0:
        print("\n".join((proc.stdout + proc.stderr).splitlines()[-40:]), file=sys.stderr)
        sys.exit(f"{what} exited {proc.returncode}")
    return time.time() - t0


def run_group(cmd, *, env, timeout: float, cwd: str = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the WHOLE group (torchrun's workers
    too, which a plain ``subprocess.run`` timeout would leave orphaned) and raise."""
    import signal

    import time

    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    name = os.path.basename(str(next((c for c in cmd if str(c).endswith(".py")), cmd[-1])))
    t0 = time.monotonic()
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        tail = "\n".join((out + "\n" + err).splitlines()[-60:])
        raise AssertionError(f"{' '.join(map(str, cmd[:6]))} timed out after {timeout} s (process group killed):\n{tail}")
    finally:
        LAUNCHES.append((name, time.monotonic() - t0, timeout))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def write_result(obj) -> None:
    """Called inside a worker: write this rank's JSON result to $OUT_DIR/rank{r}.json."""
    rank = int(os.environ.get("RANK", "0"))
    out = os.environ["OUT_DIR"]
    with open(os.path.join(out, f"rank{rank}.json.tmp"), "w") as f:
        json.dump(obj, f)
    os.replace(os.path.join(out, f"rank{rank}.json.tmp"), os.path.join(out, f"rank{rank}.json"))
