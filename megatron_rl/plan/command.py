"""``megatron-rl plan``: check a cluster job from one CPU box, with the job's own code.

    megatron-rl plan --config configs/gpu_70b_64gpu.yaml
    megatron-rl plan --config configs/gpu_7b_8gpu.yaml --hf-config DIR train.recompute=none --json

Validation (``config.validate`` with the HF config and the world size), meta-device shapes
for every rank position (:mod:`.shapes`), training memory (:mod:`.memory`), rollout memory
(:mod:`.rollout`), the weight-sync plan at the real world size (:mod:`.sync`) and a verdict
(:mod:`.verdict`). Prints a table and ends with one JSON line (``--json``: the JSON only).
Exit status 0 when it fits, 1 when it does not, 2 on a config error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from transformers import AutoConfig

from megatron_rl.config import load_config
from megatron_rl.errors import ConfigError, config_error
from megatron_rl.metrics import quiet_known_noise
from megatron_rl.models.shape import ModelShape
from megatron_rl.plan.memory import largest_micro_batch, train_memory
from megatron_rl.plan.rollout import rollout_memory
from megatron_rl.plan.shapes import build_shapes
from megatron_rl.plan.sync import Links, plan_sync
from megatron_rl.plan.table import render
from megatron_rl.plan.verdict import verdict

GiB = 1 << 30


def _args(argv):
    ap = argparse.ArgumentParser(prog="megatron-rl plan", description="Plan a cluster job on one CPU box.")
    ap.add_argument("--config", required=True, help="the job's YAML config")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, as for train (train.recompute=none)")
    ap.add_argument("--hf-config", default=None, help="a directory with the model's config.json "
                    "(default: model.hf_path, else configs/models/<its last part> beside the config)")
    ap.add_argument("--world-size", type=int, default=None, help="ranks of the launch (default: parallel.world_size)")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="device memory per GPU, GiB (default 80)")
    ap.add_argument("--reserve-gib", type=float, default=4.0,
                    help="CUDA context, NCCL buffers, allocator slack per GPU, GiB (default 4)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (default 8)")
    ap.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink GB/s per direction per GPU (default 450)")
    ap.add_argument("--nic-gbs", type=float, default=50.0, help="NIC GB/s per direction per GPU (default 50: 400 Gb/s)")
    ap.add_argument("--check-files", action="store_true", help="also check the config's paths exist on this box")
    ap.add_argument("--json", action="store_true", help="print the JSON line only")
    return ap.parse_args(argv)


def _hf_config_dir(args, cfg) -> str:
    """Where the model's config.json comes from: --hf-config, else model.hf_path, else the published copy
    beside the config (``configs/models/<last part of model.hf_path>``; a CPU box lacks the cluster's path).
    --check-files asks for the real path."""
    candidates = [args.hf_config] if args.hf_config else [cfg.model.hf_path]
    if not args.hf_config and not args.check_files:
        name = os.path.basename(os.path.normpath(cfg.model.hf_path))
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(args.config)), "models", name))
    for d in candidates:
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise config_error("model.hf_path", f"no config.json in {' or '.join(map(repr, candidates))} on this machine",
                       "pass --hf-config DIR holding a copy of the model's config.json "
                       "(published ones: configs/models/, tests/fixtures/models/)")


def _validated(args):
    cfg = load_config(args.config, overrides=args.overrides)
    world = args.world_size or cfg.parallel.world_size
    if world is None:
        raise config_error("parallel.world_size", "is not set and --world-size was not given",
                           "set parallel.world_size in the config or pass --world-size N")
    hf_dir = _hf_config_dir(args, cfg)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    cfg.validate(world_size=world, hf_config=hf_config, files=args.check_files)
    return cfg, hf_config, world, hf_dir


def _terms(t) -> dict:
    return dict(asdict(t), state=t.state, activation_terms=t.activation_terms, step_peak=t.step_peak)


def run(args) -> dict:
    """The plan as one JSON-ready dict (raises ConfigError before any work)."""
    cfg, hf_config, world, hf_dir = _validated(args)
    shape = ModelShape.from_hf_config(hf_config)
    gpu, reserve = int(args.gpu_gib * GiB), int(args.reserve_gib * GiB)
    ranks = build_shapes(cfg, hf_config, world_size=world)
    mb = largest_micro_batch(cfg, world_size=world)
    train = [train_memory(cfg, shape, r, mb, world_size=world) for r in ranks]
    rollout = rollout_memory(cfg, shape, gpu_bytes=gpu)
    links = Links(nvlink=args.nvlink_gbs * 1e9, nic=args.nic_gbs * 1e9, gpus_per_node=args.gpus_per_node)
    sync = plan_sync(cfg, shape, world_size=world, links=links)
    v = verdict(cfg, train, rollout, sync, gpu_bytes=gpu, reserve=reserve)
    return {"plan": os.path.basename(args.config), "verdict": v.word, "fits": v.fits,
            "breaking_term": v.breaking_term, "fix": v.fix, "world_size": world, "gpu_bytes": gpu,
            "reserve_bytes": reserve, "phases": v.phases, "hf_config": hf_dir,
            "hf_config_is_published_copy": os.path.normpath(hf_dir) != os.path.normpath(args.hf_config or cfg.model.hf_path),
            "shapes": {"positions": len(ranks), "layout_agrees": not any(r.mismatches for r in ranks),
                       "mismatches": [m for r in ranks for m in r.mismatches][:5],
                       "params_per_rank": {r.label: r.numel for r in ranks}},
            "micro_batch": asdict(mb), "train_worst": _terms(max(train, key=lambda t: t.step_peak)),
            "train_first": _terms(train[0]), "step_peak": {t.label: t.step_peak for t in train},
            "rollout": dict(asdict(rollout), kv_tokens=rollout.kv_tokens,
                            sequences=rollout.sequences(cfg.rollout.max_model_len)),
            "sync": asdict(sync), "sync_makespan_over_bound": round(sync.makespan_over_bound, 4),
            "sync_cost_model": "planner (sync_cost): a bucket lasts as long as its busiest rank's larger of bytes "
                               "sent and received, buckets in sequence, bound = busiest rank's total"}


def main(argv=None) -> int:
    args = _args(argv)
    quiet_known_noise()  # megatron-core's "Apex / Transformer Engine not installed" lines say nothing here
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # plans on the host: the meta build must not touch a GPU
    try:
        out = run(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if not args.json:
        print(render(out))
    print(json.dumps(out, separators=(",", ":")))
    return 0 if out["fits"] else 1
