"""launch/slurm.sbatch on a real slurm: two slurmd "nodes" in network namespaces.

The test installs Debian's slurm-wlm pieces and munge if they are missing (apt-get; quick
when installed), starts munged, slurmctld and two slurmd from a generated config in a temp
dir (tests/workers/launch_hosts.py), and submits launch/slurm.sbatch with sbatch, twice:
- a good job (2 nodes x 2 ranks): COMPLETED, exit 0:0, per-node logs, ranks on both nodes,
  results equal to the same arithmetic done here in float64;
- a job whose rank 3 raises in "rollout": FAILED, non-zero exit, and the FIRST FAILURE block
  near the top of slurm's output file names rank 3 and the phase.
Every daemon is stopped and both namespaces removed at the end.
"""
import json
import os
import subprocess

import pytest
import torch

from _launch import REPO, skip_or_fail
from test_launch import WORKER, launch_env, statuses, write_config

import launch_hosts  # noqa: E402 (tests/workers is on sys.path via test_launch)

pytestmark = pytest.mark.multirank
SBATCH = os.path.join(REPO, "launch", "slurm.sbatch")


def expected_history(*, steps: int, world: int, lr: float, seed: int) -> list:
    """The worker's arithmetic (tests/workers/launch_worker.py) without any process group."""
    w = torch.zeros(16, dtype=torch.float64)
    out = []
    for step in range(steps):
        samples = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(seed + 1000 * step + r),
                                           dtype=torch.float64) for r in range(world)])  # (world, 16)
        grad = sum(samples.mean(0) * (r + 1) + w for r in range(world))
        w = w - lr * grad / world
        out.append(w.clone())
    return out


def test_slurm_sbatch_two_nodes(tmp_path):
    err = launch_hosts.ensure_tools(["munged", "slurmctld", "slurmd", "sbatch", "ip", "nsenter", "unshare"])
    if err:
        skip_or_fail(f"cannot install slurm here: {err}")
    try:
        hosts = launch_hosts.NetnsHosts(2, workdir=str(tmp_path)).__enter__()
    except (subprocess.CalledProcessError, OSError) as e:
        skip_or_fail(f"network namespaces cannot be created here: {(getattr(e, 'stderr', '') or str(e)).strip()}")
    try:
        (tmp_path / "slurm").mkdir()
        with launch_hosts.SlurmCluster(hosts, workdir=str(tmp_path / "slurm")) as cluster:
            _good_job(cluster, hosts, tmp_path)
            _failing_job(cluster, hosts, tmp_path)
    finally:
        hosts.close()
    assert not [ln for ln in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
                if str(tmp_path) in ln], "a slurm daemon or job process outlived the test"


def _submit(cluster, tmp_path, name, **env):
    cfg, run_dir = write_config(tmp_path / name, steps=3)
    out_dir = tmp_path / name / "out"
    out_dir.mkdir()
    job_env = launch_env(CONFIG=cfg, JOB=WORKER, OUT_DIR=out_dir, NPROC_PER_NODE=2, MASTER_PORT=29500, **env)
    job_id = cluster.sbatch(["--nodes=2", f"--output={tmp_path}/{name}-%j.out", SBATCH], env=job_env, cwd=REPO)
    fields = cluster.wait_job(job_id, timeout=240)
    return fields, open(f"{tmp_path}/{name}-{job_id}.out").read(), run_dir, out_dir


def _good_job(cluster, hosts, tmp_path):
    (tmp_path / "good").mkdir()
    fields, text, run_dir, out_dir = _submit(cluster, tmp_path, "good")
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), (fields, text[-3000:])
    assert f"rendezvous {hosts.addrs[0]}:29500" in text and "[slurm.sbatch] exit 0" in text, text
    for name in hosts.names:  # one torchrun log per node
        assert os.path.getsize(os.path.join(run_dir, "logs", f"node-{name}.log")) > 0
    assert sorted(s["host"] for s in statuses(run_dir)) == sorted(hosts.names * 2)
    assert all(s["state"] == "done" for s in statuses(run_dir))
    want = expected_history(steps=3, world=4, lr=0.1, seed=1234)
    for r in range(4):
        got = json.load(open(out_dir / f"rank{r}.json"))["history"]
        for step, (g, w) in enumerate(zip(got, want)):
            g = torch.tensor([float.fromhex(x) for x in g], dtype=torch.float64)
            assert torch.allclose(g, w, rtol=1e-12, atol=1e-14), (r, step, (g - w).abs().max())


def _failing_job(cluster, hosts, tmp_path):
    (tmp_path / "bad").mkdir()
    fields, text, run_dir, _ = _submit(cluster, tmp_path, "bad", FAULT="raise:rollout:3")
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", fields
    lines = text.splitlines()
    heads = [i for i, ln in enumerate(lines) if ln.startswith("FIRST FAILURE:")]
    assert len(heads) == 1 and heads[0] <= 2, text  # at the top of slurm's output file
    head = lines[heads[0]]
    assert "rank 3 " in head and "phase 'rollout'" in head and "injected fault" in head, head
    assert "Exited with exit code" in open(os.path.join(run_dir, "logs", "srun.log")).read()
