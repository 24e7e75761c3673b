"""``megatron-rl lm-train``: an SPMD language-model training job on megatron-core.

Loads HF weights into the configured layout (TP/PP/CP/DP, SP, distributed optimizer), trains
``train.steps`` steps (the same global batch at any layout), and prints one line per step on
rank 0, then a final JSON line. ``--save DIR`` writes a megatron-core dist checkpoint at the end
(through megatron_rl.checkpoint). The data (``--data``):

- ``motif``: synthetic next-token data (a repeated random motif), loss on every token;
- ``sft``: supervised fine-tuning on ``data.dataset``'s training rows (never a ``data.eval_*``
  held-out prompt), ``prompt + answer + EOS`` with the loss on the answer and EOS only
  (:mod:`megatron_rl.data.sft`). The SFT phase of the SFT-then-RL demo (``launch/demo.sh``).

Usage (under torchrun)::

    torchrun --nproc-per-node 4 -m megatron_rl.cli lm-train --config configs/tiny_cpu.yaml \\
        model.hf_path=runs/tiny-llama train.steps=5 --seq-len 32
    torchrun --nproc-per-node 4 -m megatron_rl.cli lm-train --config configs/sft_rl_cpu.yaml --data sft \
        --seq-len 16 --global-batch 64 --save runs/sft/megatron
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoConfig

from megatron_rl import console
from megatron_rl.checkpoint import CheckpointError
from megatron_rl.checkpoint.megatron import read_meta
from megatron_rl.checkpoint.spmd import load_checkpoint, save_checkpoint
from megatron_rl.config import ConfigError, load_config
from megatron_rl.config import validate as validate_config
from megatron_rl.data import PromptDataset, encode_prompt, load_split
from megatron_rl.data.sft import sft_batch, sft_example
from megatron_rl.parallel import destroy_distributed, init_distributed
from megatron_rl.parallel.grid import LayoutError
from megatron_rl.runtime import run_rank
from megatron_rl.train.engine import TrainEngine
from megatron_rl.train.lm import synthetic_batches


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="megatron-rl lm-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML config (sections model, parallel, train)")
    ap.add_argument("--data", choices=("motif", "sft"), default="motif",
                    help="motif: synthetic next-token data; sft: data.dataset's training rows, loss on the answer only")
    ap.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (divisible by 2*cp, and tp with SP)")
    ap.add_argument("--micro-batch-size", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per step over all DP ranks")
    ap.add_argument("--load", help="start from this megatron_rl checkpoint (any saved layout) instead of "
                    "model.hf_path's weights")
    ap.add_argument("--save", help="write a megatron_rl checkpoint (dist checkpoint + metadata) here at the end")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 parallel.tp=2")
    return ap.parse_args(argv)


def validate(args, cfg, world: int, hf_config) -> int:
    """All checks that need no process group. Returns micro-batches per DP rank."""
    if args.save and os.path.exists(args.save) and os.listdir(args.save):
        raise ConfigError(f"config error: --save: {args.save!r} exists and is not empty; fix: pass a new directory")
    if args.load:
        read_meta(args.load)  # one clear error for a missing or incomplete checkpoint
    validate_config(cfg, world_size=world, hf_config=hf_config, files=False)  # the world, RoPE and the layouts
    if args.data == "sft":
        missing = [r.get("id") for r in load_split(cfg.data).train if "answer" not in r]
        if missing:
            raise ConfigError(f"config error: data.dataset: {len(missing)} training rows (ids {missing[:3]}...) have no "
                              "'answer' to train on; fix: SFT (--data sft) needs rows with an answer field")
    p = cfg.parallel
    if args.seq_len % (2 * p.cp if p.cp > 1 else 1) or (p.sequence_parallel and args.seq_len % p.tp):
        raise ConfigError(f"config error: --seq-len: {args.seq_len} must be divisible by 2*parallel.cp={2 * p.cp} "
                          f"(and by parallel.tp={p.tp} with sequence parallel); fix: choose another --seq-len")
    dp = cfg.data_parallel_size(world)
    if args.global_batch % (dp * args.micro_batch_size):
        raise ConfigError(f"config error: --global-batch: {args.global_batch} is not a multiple of "
                          f"DP {dp} x --micro-batch-size {args.micro_batch_size}; fix: choose a multiple")
    return args.global_batch // (dp * args.micro_batch_size)


def _hf_config(path: str):
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"config error: model.hf_path: {path!r} has no config.json; "
                          "fix: point it at an HF model directory (megatron-rl make-tiny-model --out DIR)")
    return AutoConfig.from_pretrained(path)


def prepare(args):
    """Every check that needs no process group: (cfg, hf_config, world, micro-batches per DP rank)."""
    cfg = load_config(args.config, overrides=args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    hf_config = _hf_config(cfg.model.hf_path)
    return cfg, hf_config, world, validate(args, cfg, world, hf_config)


def _data(args, cfg, hf_config, *, num: int):
    """``step -> the global batch`` (``num`` micro-batches of ``--micro-batch-size``), the same on every rank."""
    if args.data == "motif":
        return lambda step: synthetic_batches(vocab=hf_config.vocab_size, num=num, batch=args.micro_batch_size,
                                              seq=args.seq_len, seed=cfg.train.seed + step)
    from transformers import AutoTokenizer  # lazy: only the SFT data needs the tokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    chat = cfg.data.chat_template
    rows = PromptDataset.from_config(cfg.data, prompt_len=lambda p: len(encode_prompt(tok, p, chat_template=chat)))
    mb = args.micro_batch_size

    def batches(step: int) -> list[dict]:
        examples = [sft_example(tok, r, chat_template=chat) for r in rows.next_batch(num * mb)]
        return [sft_batch(examples[i * mb:(i + 1) * mb], seq_len=args.seq_len, pad_id=tok.pad_token_id)
                for i in range(num)]
    return batches


def run(args, prepared, rt) -> dict:
    cfg, hf_config, world, micro = prepared
    dtype = getattr(torch, cfg.model.dtype)
    topo = init_distributed(cfg.parallel, world_size=world, seed=cfg.train.seed)
    grid, rank, coord = topo.grid, topo.rank, topo.coord
    eng = TrainEngine(hf_config, parallel=cfg.parallel, train=cfg.train, topo=topo, dtype=dtype,
                      hf_path=cfg.model.hf_path, vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
    if args.load:
        load_checkpoint(eng.model[0], args.load)  # collective; dist-checkpointing reshards any saved layout
    history, next_batches = [], _data(args, cfg, hf_config, num=micro * grid.dp)
    for step in range(cfg.train.steps):
        batches = next_batches(step)
        t0 = time.perf_counter()
        with rt.phase("train"):
            out = eng.step(batches[coord.dp::grid.dp])
        out["time_s"] = time.perf_counter() - t0
        history.append(out)
        if rank == 0:
            print(f"step {step + 1}/{cfg.train.steps} loss {out['loss']:.6f} grad_norm {out['grad_norm']:.6f} "
                  f"tokens {out['tokens']} time {out['time_s']:.2f}s", file=console.stdout(), flush=True)
    if args.save:
        hf_dir = os.path.join(args.load, "hf") if args.load else cfg.model.hf_path
        with rt.phase("checkpoint"):  # atomic: temp sibling + rename
            save_checkpoint(eng.model[0], args.save, hf_dir=hf_dir,
                            vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)
        if rank == 0:
            print(f"saved megatron_rl checkpoint to {args.save}", file=console.stdout(), flush=True)
    summary = {"job": "lm-train", "data": args.data, "layout": {"tp": grid.tp, "pp": grid.pp, "cp": grid.cp, "dp": grid.dp,
                                              "sp": cfg.parallel.sequence_parallel,
                                              "distributed_optimizer": cfg.parallel.distributed_optimizer},
               "loss": [h["loss"] for h in history], "grad_norm": [h["grad_norm"] for h in history]}
    if rank == 0:
        print(json.dumps(summary), file=console.stdout(), flush=True)
    destroy_distributed()
    return summary


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        prepared = prepare(args)
    except (ConfigError, LayoutError, CheckpointError) as e:
        if os.environ.get("RANK", "0") == "0":  # deterministic: every rank fails the same way
            print(str(e), file=console.stderr())
        return 2

    def job(rt) -> int:
        run(args, prepared, rt)
        return 0

    return run_rank(job, run_dir=prepared[0].logging.run_dir, timeout_s=prepared[0].parallel.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
