"""Two "nodes" on this machine: launch/torchrun.sh in two network namespaces joined by a veth pair.

Each namespace has its own address, hostname and /etc/hosts (tests/workers/launch_hosts.py);
one torchrun per namespace starts 2 ranks. Checked in a few launches:
- the real training job, ``megatron-rl lm-train`` (megatron-core TP2 x PP2 on the tiny llama),
  completes on both nodes and its losses and grad norms equal a single-node world-4 run, bitwise;
- each node kept the logs of its own 2 ranks;
- ``megatron-rl preflight`` across the nodes reports all 4 ranks and passes;
- preflight refuses mismatched package versions across nodes with one error line, and the
  FIRST FAILURE block names it.
Skips, with the reason, only where network namespaces cannot be created.
"""
import glob
import json
import os
import subprocess

import pytest

from _launch import REPO, free_port, skip_or_fail
from test_launch import launch_env, write_config

import launch_hosts  # noqa: E402 (tests/workers is on sys.path via test_launch)

pytestmark = pytest.mark.multirank
LAUNCH = os.path.join(REPO, "launch", "torchrun.sh")


def _netns_or_skip(workdir):
    err = launch_hosts.ensure_tools(["ip", "nsenter", "unshare"])
    if err:
        skip_or_fail(f"network namespaces unavailable: {err}")
    try:
        return launch_hosts.NetnsHosts(2, workdir=str(workdir)).__enter__()
    except (subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        skip_or_fail(f"network namespaces cannot be created here: {detail.strip()}")


def _two_node_launch(hosts, tmp, *, name, env_extra, node_env=None, args=(), timeout=400):
    """Run launch/torchrun.sh on both hosts (2 ranks each); return [(rc, console text)] per node."""
    procs, logs = [], []
    port = free_port()
    for i in range(2):
        env = launch_env(NNODES=2, NPROC_PER_NODE=2, NODE_RANK=i, MASTER_ADDR=hosts.addrs[0], MASTER_PORT=port,
                         RDZV_ID=name, RDZV_TIMEOUT=60, **env_extra)
        env.update((node_env or {}).get(i, {}))
        log = tmp / f"{name}-node{i}.log"
        logs.append(log)
        with open(log, "w") as f:
            procs.append(hosts.popen(i, ["bash", LAUNCH, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    out = []
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            launch_hosts.kill_tree(p.pid)
            rc = "timeout"
        out.append((rc, log.read_text()))
    return out


def _lm_summary(console: str) -> dict:
    """The final JSON line ``megatron-rl lm-train`` prints on rank 0 (after torchrun's prefix)."""
    lines = [ln.split("]:", 1)[-1] for ln in console.splitlines() if '{"job": "lm-train"' in ln]
    assert len(lines) == 1, console[-3000:]
    return json.loads(lines[0])


LM_ARGS = ("--seq-len", "32", "--micro-batch-size", "2", "--global-batch", "4")


def test_two_nodes_equal_single_node_and_preflight(tmp_path, tiny_models):
    cfg, run_dir = write_config(tmp_path, steps=2, tp=2, pp=2, timeout_s=120, hf_path=tiny_models["llama"])
    # Reference: the training job on one node, 4 ranks (TP2 x PP2).
    p = subprocess.run(["bash", LAUNCH, *LM_ARGS], cwd=REPO, env=launch_env(CONFIG=cfg, JOB="lm-train",
                                                                           NPROC_PER_NODE=4),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    ref = _lm_summary(p.stdout + p.stderr)

    hosts = _netns_or_skip(tmp_path)
    try:
        # The same job on two nodes x 2 ranks.
        res = _two_node_launch(hosts, tmp_path, name="lm", env_extra=dict(CONFIG=cfg, JOB="lm-train"),
                               args=LM_ARGS)
        assert [rc for rc, _ in res] == [0, 0], "\n".join(t[-3000:] for _, t in res)
        two = _lm_summary("\n".join(t for _, t in res))
        print(f"lm-train loss 1 node x 4: {ref['loss']}, 2 nodes x 2: {two['loss']}")
        assert two["layout"] == ref["layout"] == {"tp": 2, "pp": 2, "cp": 1, "dp": 1, "sp": False,
                                                  "distributed_optimizer": False}
        assert two["loss"] == ref["loss"] and two["grad_norm"] == ref["grad_norm"]  # bitwise
        for node in ("node0", "node1"):  # each node kept its own ranks' logs
            logs = glob.glob(os.path.join(run_dir, "logs", node, "lm_*", "attempt_0", "*", "stdout.log"))
            assert len(logs) == 2, (node, logs)

        # Preflight across the two nodes: every rank answers, versions agree.
        res = _two_node_launch(hosts, tmp_path, name="preflight", env_extra=dict(CONFIG=cfg, JOB="preflight"))
        assert [rc for rc, _ in res] == [0, 0], "\n".join(t[-3000:] for _, t in res)
        report = json.load(open(os.path.join(run_dir, "preflight.json")))
        assert [i["rank"] for i in report["ranks"]] == [0, 1, 2, 3] and report["version_mismatches"] == []
        assert sorted({i["host"] for i in report["ranks"]}) == sorted(hosts.names)
        for info in report["ranks"]:
            assert info["device"] == "cpu" and info["free_mem_gib"] > 0
            assert set(info["versions"]) >= {"torch", "vllm", "megatron-core", "transformers", "megatron_rl"}
        console = "\n".join(t for _, t in res)
        assert "preflight: ok" in console and "all 4 ranks answered" in console

        # Node 1 sees another transformers version (a dist-info first on its path): refused.
        fake = tmp_path / "fake-site" / "transformers-0.0.1.dist-info"
        fake.mkdir(parents=True)
        (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 0.0.1\n")
        node1 = {1: {"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}}
        res = _two_node_launch(hosts, tmp_path, name="mismatch", env_extra=dict(CONFIG=cfg, JOB="preflight"),
                               node_env=node1)
        assert all(rc not in (0, "timeout") for rc, _ in res), res
        console = "\n".join(t for _, t in res)
        # rank 0's console lines carry torchrun's "[default0]:" prefix
        errors = [ln.split("]:", 1)[-1] for ln in console.splitlines() if "preflight error:" in ln]
        assert len(errors) == 1, console[-4000:]
        assert errors[0].startswith("preflight error: package versions differ")
        assert (f"transformers: 0.0.1 on {hosts.names[1]}" in errors[0] and f"on {hosts.names[0]}" in errors[0]
                and "fix:" in errors[0]), errors
        heads = [ln for ln in console.splitlines() if ln.startswith("FIRST FAILURE:")]
        assert heads and all("PreflightError" in h and "phase 'preflight'" in h for h in heads), heads
    finally:
        hosts.close()
