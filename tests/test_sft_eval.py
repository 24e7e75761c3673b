"""Tier 1: the SFT-then-RL pieces by hand: the addition task and its exact-match reward, the
held-out eval split (never overlapping the training rows), the answer-only SFT loss mask, the
eval config checks, and the evaluator's pass@1 / pass@k on a scripted engine."""
import json

import pytest

from megatron_rl.config import ConfigError, load_config
from megatron_rl.data import PromptDataset, load_split, synthetic_rows
from megatron_rl.data.sft import sft_batch, sft_example
from megatron_rl.evaluation import Evaluator, pass_rate
from megatron_rl.models.tiny import build_tokenizer
from megatron_rl.rewards import exact_match
from megatron_rl.rollout.base import Generation

pytestmark = pytest.mark.unit


def _data(**kw):
    return load_config(overrides=[f"data.{k}={v}" for k, v in kw.items()] + ["logging.eval_every=5"]).data


# -- the addition task -------------------------------------------------------------------------

def test_addition_rows_are_distinct_sums_and_exact_match_scores_them():
    rows = synthetic_rows("addition", num_rows=10_000, seed=0)
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == 10_000  # every (a, b) with a, b < 100 exactly once
    assert set(prompts) == {f"{a}+{b}=" for a in range(100) for b in range(100)}
    for r in rows[:500]:
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert r["answer"] == str(a + b)
        assert exact_match(f" {a + b}\n", sample=r) == 1.0
        assert exact_match(str(a + b + 1), sample=r) == 0.0  # negative control: off by one
        assert exact_match(f"{a + b}0", sample=r) == 0.0     # a longer number is wrong too
    assert rows == synthetic_rows("addition", num_rows=10_000, seed=0)
    assert [r["prompt"] for r in synthetic_rows("addition", num_rows=50, seed=1)] != prompts[:50]
    with pytest.raises(ConfigError, match=r"data.synthetic_size: 10001 > the 10000 distinct addition prompts"):
        load_config(overrides=["data.dataset=synthetic:addition", "data.synthetic_size=10001", "data.reward=exact_match"])


# -- the held-out split ------------------------------------------------------------------------

def test_eval_split_holds_out_rows_that_training_never_draws():
    data = _data(dataset="synthetic:addition", reward="exact_match", synthetic_size=600, eval_size=100)
    split = load_split(data)
    every = synthetic_rows("addition", num_rows=600, seed=data.seed)
    train_p, eval_p = {r["prompt"] for r in split.train}, {r["prompt"] for r in split.eval}
    assert len(split.eval) == 100 and len(split.train) == 500
    assert not train_p & eval_p and train_p | eval_p == {r["prompt"] for r in every}
    assert load_split(data).eval == split.eval  # the same on every rank and in every job (SFT and RL)
    other = load_split(_data(dataset="synthetic:addition", reward="exact_match", synthetic_size=600, eval_size=100,
                             seed=7)).eval
    assert {r["prompt"] for r in other} != eval_p
    # The training stream, over more than one epoch, never yields a held-out prompt ...
    ds = PromptDataset.from_config(data)
    drawn = {r["prompt"] for _ in range(3) for r in ds.next_batch(500)}
    assert drawn == train_p
    # ... while the dataset without a split would (the negative control).
    plain = PromptDataset.from_config(load_config(overrides=["data.dataset=synthetic:addition", "data.reward=exact_match",
                                                             "data.synthetic_size=600"]).data)
    assert {r["prompt"] for r in plain.next_batch(600)} & eval_p == eval_p


def test_eval_dataset_prompts_are_dropped_from_training(tmp_path, tiny_models):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    held.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in ("q3", "q5", "q11")))
    split = load_split(_data(dataset=str(train), eval_dataset=str(held)))
    assert [r["prompt"] for r in split.eval] == ["q3", "q5", "q11"]
    assert [r["prompt"] for r in split.train] == [f"q{i}" for i in range(10) if i not in (3, 5)]
    first2 = load_split(_data(dataset=str(train), eval_dataset=str(held), eval_size=2))
    assert [r["prompt"] for r in first2.eval] == ["q3", "q5"]
    with pytest.raises(ConfigError, match=r"data.eval_dataset: file '.*nope.jsonl' does not exist"):
        load_config(overrides=[f"model.hf_path={tiny_models['llama']}", f"data.eval_dataset={tmp_path / 'nope.jsonl'}",
                               "logging.eval_every=1"]).check_files()


def test_eval_config_errors_name_the_field_and_the_fix():
    cases = [(["logging.eval_every=5"], r"logging.eval_every: 5 but there is no eval set; fix: set data.eval_size=N"),
             (["data.eval_size=8"], r"data.eval_size: names an eval set but logging.eval_every=0 never runs it; fix:"),
             (["data.eval_size=8", "logging.eval_every=2", "data.eval_pass_k=9"],
              r"data.eval_pass_k: 9 > algorithm.group_size=8; fix: use k <= algorithm.group_size"),
             (["data.eval_size=8", "logging.eval_every=2", "data.eval_pass_k=1"], r"data.eval_pass_k: 1: greedy pass@1"),
             (["data.eval_size=1024", "logging.eval_every=2"], r"data.eval_size: 1024 >= data.synthetic_size=1024"),
             (["data.eval_dataset=synthetic:nope", "logging.eval_every=2"], r"data.eval_dataset: unknown synthetic task")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=overrides)
    load_config(overrides=["data.eval_size=8", "logging.eval_every=2", "data.eval_pass_k=8"])  # legal


# -- the answer-only SFT mask ------------------------------------------------------------------

def test_sft_batch_masks_everything_but_the_answer_and_eos():
    tok = build_tokenizer()
    rows = [{"prompt": "4+5=", "answer": "9"}, {"prompt": "47+38=", "answer": "85"}]
    batch = sft_batch([sft_example(tok, r, chat_template=False) for r in rows], seq_len=10, pad_id=tok.pad_token_id)
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (2, 10)
    # Char-level tokenizer: "4+5=" is 4 tokens, then "9" and EOS; labels are the next tokens.
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]]
    for b, r in enumerate(rows):
        kept = batch["labels"][b][batch["loss_mask"][b] == 1].tolist()
        assert tok.decode(kept) == r["answer"] + tok.eos_token  # exactly the answer and the EOS ...
        dropped = batch["labels"][b][batch["loss_mask"][b] == 0].tolist()
        assert r["prompt"][1:] in tok.decode(dropped)  # ... and never the prompt (the negative control)
        assert tok.decode(batch["tokens"][b][:len(r["prompt"])].tolist()) == r["prompt"]
    with pytest.raises(ConfigError, match=r"--seq-len: 4 is shorter than an SFT example \(8 tokens"):
        sft_batch([sft_example(tok, rows[1], chat_template=False)], seq_len=4, pad_id=0)
    with pytest.raises(ConfigError, match="has no 'answer'"):
        sft_example(tok, {"prompt": "x", "id": 3}, chat_template=False)


# -- the evaluator -----------------------------------------------------------------------------

def test_pass_rate_by_hand():
    assert pass_rate([1, 0, 1], k=1) == pytest.approx(2 / 3)
    assert pass_rate([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], k=4) == pytest.approx(2 / 3)
    assert pass_rate([0.5, 0.99], k=2) == 0.0  # partial rewards do not count as solved
    with pytest.raises(ValueError, match="not whole groups"):
        pass_rate([1, 0, 1], k=2)


class ScriptedEngine:
    """Answers ``a+b=`` right when a is even (greedy), and on the last of k samples when a is odd."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def generate(self, prompts, *, sampling):
        self.calls.append(sampling)
        out = []
        for i, ids in enumerate(prompts):
            a, b = map(int, self.tok.decode(ids)[:-1].split("+"))
            right = a % 2 == 0 if sampling.temperature == 0 else (a % 2 == 0 or i % 4 == 3)
            text = str(a + b) if right else str(a + b + 1)
            out.append(Generation(prompt=ids, tokens=self.tok(text).input_ids + [self.tok.eos_token_id], logprobs=[]))
        return out


def test_evaluator_greedy_pass1_and_sampled_pass_k():
    tok = build_tokenizer()
    cfg = load_config(overrides=["data.dataset=synthetic:addition", "data.reward=exact_match", "data.synthetic_size=400",
                                 "data.eval_size=40", "logging.eval_every=3", "data.eval_pass_k=4"])
    ev = Evaluator.from_config(cfg, tokenizer=tok, reward_fn=exact_match)
    engine = ScriptedEngine(tok)
    got = ev.run(engine, step=3)
    evens = sum(1 for r in load_split(cfg.data).eval if int(r["prompt"].split("+")[0]) % 2 == 0) / 40
    assert 0 < evens < 1
    assert got == {"eval/pass@1": pytest.approx(evens), "eval/reward_mean": pytest.approx(evens), "eval/pass@4": 1.0}
    assert engine.calls[0].temperature == 0.0 and engine.calls[1].temperature == cfg.rollout.temperature
    assert ev.history == [(3, got)] and "40 prompts" in ev.summary()
    assert [s for s in range(1, 10) if ev.due(s, start=1)] == [1, 3, 6, 9]  # the run's first step, then every 3rd


def test_lm_train_sft_refuses_rows_without_an_answer_before_any_work(tiny_models, tmp_path, monkeypatch):
    from megatron_rl.train import lm_job

    rows = tmp_path / "q.jsonl"
    rows.write_text('{"prompt": "1+1="}\n{"prompt": "2+2=", "answer": "4"}\n')
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = ["--data", "sft", f"model.hf_path={tiny_models['llama']}", f"data.dataset={rows}", "data.reward=exact_match"]
    with pytest.raises(ConfigError, match=r"data.dataset: 1 training rows \(ids \[0\]...\) have no 'answer'"):
        lm_job.prepare(lm_job.parse_args(argv))
    assert lm_job.prepare(lm_job.parse_args(argv[:3] + ["data.dataset=synthetic:addition", "data.reward=exact_match"]))
