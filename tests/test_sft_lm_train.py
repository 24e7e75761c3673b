"""Tier 2: ``megatron-rl lm-train --data sft`` at world 2 (megatron-core TP2, gloo) trains on the
answer only: its first step's loss (the initial weights) equals HF transformers' cross-entropy
over the answer and EOS tokens of the same 16 training rows, and differs from the loss over
every token (the negative control); ``--save`` writes the checkpoint the RL phase starts from."""
import json
import os
import sys

import pytest

from _launch import REPO, free_port, launch_env, run_group

pytestmark = [pytest.mark.multirank]


def test_sft_first_step_loss_is_hf_answer_only_cross_entropy(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rl.config import load_config
    from megatron_rl.data import PromptDataset
    from megatron_rl.data.sft import sft_batch, sft_example

    model = tiny_models["llama"]
    overrides = [f"model.hf_path={model}", "parallel.world_size=2", "parallel.tp=2", "parallel.pp=1",
                 "train.steps=2", f"logging.run_dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megatron_rl.cli", "lm-train", "--config",
           os.path.join(REPO, "configs", "sft_rl_cpu.yaml"), "--data", "sft", "--seq-len", "10",
           "--micro-batch-size", "8", "--global-batch", "16", "--save", str(tmp_path / "sft"), *overrides]
    proc = run_group(cmd, env=launch_env(), timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith('{"job": "lm-train"')))
    assert summary["data"] == "sft" and summary["layout"]["tp"] == 2
    assert os.path.isfile(tmp_path / "sft" / "megatron_rl.json")

    # The same first batch, scored by HF transformers from the same initial weights.
    cfg = load_config(os.path.join(REPO, "configs", "sft_rl_cpu.yaml"), overrides=overrides)
    tok = AutoTokenizer.from_pretrained(model)
    rows = PromptDataset.from_config(cfg.data).next_batch(16)
    batch = sft_batch([sft_example(tok, r, chat_template=False) for r in rows], seq_len=10, pad_id=tok.pad_token_id)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(hf(batch["tokens"]).logits.double(), dim=-1)  # (B, S, V)
    tok_logp = logp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)  # (B, S)
    answer_only = float(-(tok_logp * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
    every_token = float(-tok_logp.mean())
    print(f"sft step-1 loss {summary['loss'][0]:.6f}, HF answer-only {answer_only:.6f}, every token {every_token:.6f}")
    assert summary["loss"][0] == pytest.approx(answer_only, abs=1e-4)
    assert abs(every_token - answer_only) > 1e-2  # the control: a mask over every token would differ
