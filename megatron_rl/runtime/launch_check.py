"""Checks a launch script runs before it starts torchrun; each failure is one clear line.

Checked here, without any process group (the config's layout rules live in
:class:`megatron_rl.parallel.grid.RankGrid`; importing it runs ``megatron_rl.parallel``, which imports torch):

- ``NNODES`` and ``NPROC_PER_NODE`` are positive integers;
- ``CONFIG`` exists and loads (with the overrides), and ``NPROC_PER_NODE x NNODES`` agrees
  with the config's world size and degrees (:func:`megatron_rl.config.validate`, without files or the model);
- the rendezvous endpoint: the node that hosts it (``NODE_RANK=0``, or whichever node owns
  ``MASTER_ADDR``) can bind ``MASTER_ADDR:MASTER_PORT``; every other node can connect to it
  within ``--wait`` seconds (a bounded wait, then an error).

On success it prints three lines on stdout: the run directory, ``is_host`` (1, 0) and
``logging.verbose`` (1, 0; the launch script picks the console mode from it, see
:mod:`megatron_rl.console`)::

    python -m megatron_rl.runtime.launch_check --config c.yaml --nnodes 2 --nproc-per-node 2 \
        --node-rank 1 --master-addr 10.0.0.1 --master-port 29500 --wait 60 -- train.steps=3
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import socket
import sys
import time

from megatron_rl.config import ConfigError, load_config, validate


class LaunchError(Exception):
    """A launch that cannot work. The message names the variable and the fix."""


def _positive_int(name: str, raw: str, *, fix: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise LaunchError(f"{name}={raw!r} must be a positive integer; fix: {fix}")
    return value


def _check_config(path: str, overrides: list, *, nnodes: int, nproc: int):
    if not os.path.isfile(path):
        raise LaunchError(f"CONFIG={path!r}: file does not exist; fix: set CONFIG to an existing YAML file "
                          f"(paths are relative to {os.getcwd()})")
    world = nnodes * nproc
    try:
        cfg = load_config(path, overrides=overrides)
        validate(cfg, world_size=world, files=False)  # paths are the ranks' to check, on their nodes
    except ConfigError as e:
        raise LaunchError(f"NPROC_PER_NODE={nproc} x NNODES={nnodes} = {world} ranks with CONFIG={path}: {e}") from None
    return cfg


def _bind_error(addr: str, port: int):
    """None if ``addr:port`` can be bound here, else the OSError."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            return e
    return None


def _resolve(addr: str) -> str:
    try:
        return socket.getaddrinfo(addr, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except (socket.gaierror, UnicodeError) as e:
        raise LaunchError(f"MASTER_ADDR={addr!r} does not resolve ({e}); "
                          "fix: set MASTER_ADDR to node 0's address or hostname") from None


def _wait_connect(addr: str, port: int, wait_s: float) -> None:
    deadline, last = time.monotonic() + wait_s, None
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(0.5, wait_s))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise LaunchError(
                f"MASTER_ADDR:MASTER_PORT={addr}:{port} unreachable after {wait_s:.0f} s "
                f"({type(last).__name__}: {last.strerror or last}); fix: start node 0 (NODE_RANK=0) first, check "
                "MASTER_ADDR/MASTER_PORT and the firewall, or raise RDZV_TIMEOUT")
        time.sleep(0.5)


def _check_endpoint(addr: str, port: int, *, nnodes: int, node_rank: str, wait_s: float) -> int:
    ip = _resolve(addr)
    bind_err = _bind_error(ip, 0)
    local = bind_err is None
    is_host = (node_rank == "0") if node_rank != "" else (local or nnodes == 1)
    if is_host:
        if not local:
            raise LaunchError(f"MASTER_ADDR={addr} ({ip}) is not an address of this node, but this node "
                              f"(NODE_RANK={node_rank or 0}) hosts the rendezvous; fix: set MASTER_ADDR to this "
                              "node's address, or launch NODE_RANK=0 on the node that owns it")
        err = _bind_error(ip, port)
        if err is not None and err.errno == errno.EADDRINUSE:
            raise LaunchError(f"MASTER_PORT={port} is already in use on {addr}; fix: choose a free MASTER_PORT")
        return 1
    _wait_connect(ip, port, wait_s)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_rl.runtime.launch_check", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--nnodes", required=True)
    ap.add_argument("--nproc-per-node", required=True)
    ap.add_argument("--node-rank", default="")
    ap.add_argument("--master-addr", default="127.0.0.1")
    ap.add_argument("--master-port", default="29500")
    ap.add_argument("--wait", type=float, default=60.0)
    ap.add_argument("--no-endpoint", action="store_true", help="skip the rendezvous check (slurm batch host)")
    ap.add_argument("overrides", nargs="*", help="the job's extra args; only section.key=value ones are overrides")
    args = ap.parse_args(argv)
    # Job flags such as --seq-len 32 pass through to the job untouched; they are not config overrides.
    args.overrides = [a for a in args.overrides if re.match(r"^[A-Za-z_][\w.]*=", a)]
    try:
        nnodes = _positive_int("NNODES", args.nnodes, fix="set the number of nodes (elastic ranges like 1:4 "
                               "are not supported)")
        nproc = _positive_int("NPROC_PER_NODE", args.nproc_per_node, fix="set the number of ranks per node")
        port = _positive_int("MASTER_PORT", args.master_port, fix="set a free TCP port, e.g. 29500")
        if args.node_rank != "" and not (args.node_rank.isdigit() and int(args.node_rank) < nnodes):
            raise LaunchError(f"NODE_RANK={args.node_rank!r} must be in 0..{nnodes - 1}; fix: number the nodes "
                              "0..NNODES-1, or leave NODE_RANK unset")
        cfg = _check_config(args.config, args.overrides, nnodes=nnodes, nproc=nproc)
        is_host = 1 if args.no_endpoint else _check_endpoint(
            args.master_addr, port, nnodes=nnodes, node_rank=args.node_rank, wait_s=args.wait)
    except LaunchError as e:
        print(f"launch error: {e}", file=sys.stderr, flush=True)
        return 2
    print(cfg.logging.run_dir)
    print(is_host)
    print(int(cfg.logging.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
