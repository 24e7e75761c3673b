"""Tier 1: the reward registry and rewards by hand; prompt datasets (synthetic, JSONL, parquet)
in a deterministic, resumable order."""
import json
import random
import sys

import pytest

from megatron_rl.config import ConfigError, DataConfig
from megatron_rl.data import PromptDataset, load_rows, synthetic_rows
from megatron_rl.rewards import (compute_rewards, copy_last, digit_fraction, exact_match, extract_final_number,
                                 get_reward, math_answer, register_reward, reward_names)

pytestmark = pytest.mark.unit


# -- registry ----------------------------------------------------------------------------------

def test_registry_register_lookup_and_errors():
    @register_reward("test_len3")
    def _len3(response, *, prompt, sample, response_ids=None):
        return float(len(response) == 3)

    assert get_reward("test_len3") is _len3
    assert "test_len3" in reward_names()
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_len3")(lambda r, **k: 0.0)
    with pytest.raises(ConfigError) as e:
        get_reward("nope")
    msg = str(e.value)
    assert msg.startswith("config error: data.reward: unknown reward 'nope' (known: ")
    assert "digit_fraction" in msg and "math_answer" in msg and "fix: " in msg and "\n" not in msg
    assert get_reward("megatron_rl.rewards:exact_match") is exact_match
    with pytest.raises(ConfigError, match="data.reward: cannot import 'no_such_mod:f'"):
        get_reward("no_such_mod:f")


# -- rewards by hand ---------------------------------------------------------------------------

def test_dense_rewards_by_hand():
    assert digit_fraction("12a3") == pytest.approx(3 / 4)  # per character
    assert digit_fraction("12a3", response_ids=list(range(8))) == pytest.approx(3 / 8)  # per generated token
    assert digit_fraction("") == 0.0
    assert copy_last("xxyx", prompt="copy abcx") == pytest.approx(3 / 4)
    assert copy_last("kk", prompt="copy abcx", sample={"answer": "k"}) == 1.0


def test_verifiable_rewards_by_hand():
    assert extract_final_number("first 3, then the answer is 1,234.") == 1234.0
    assert extract_final_number("\\boxed{42} and then 7") == 42.0
    assert extract_final_number("no number") is None
    assert math_answer("so 12+7 = 19", sample={"answer": "19"}) == 1.0
    assert math_answer("so 12+7 = 18", sample={"answer": "19"}) == 0.0
    assert math_answer("x = -2.50", sample={"answer": "-2.5"}) == 1.0
    assert math_answer("nothing", sample={"answer": "3"}) == 0.0
    assert exact_match("  Paris \n", sample={"answer": "paris"}) == 1.0
    assert exact_match("Lyon", sample={"answer": "paris"}) == 0.0
    with pytest.raises(KeyError, match="'answer'"):
        math_answer("1", sample={})


def test_compute_rewards_batch_and_checks():
    got = compute_rewards(digit_fraction, ["12", "a1", ""], prompts=["p"] * 3, samples=[{}] * 3,
                          response_ids=[[5, 6], [7, 8], []])
    assert got == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="lengths differ"):
        compute_rewards(digit_fraction, ["1"], prompts=[], samples=[{}])
    with pytest.raises(ValueError, match="must be finite"):
        compute_rewards(lambda r, **k: float("nan"), ["1"], prompts=["p"], samples=[{}])


def test_digits_task_starts_low_but_nonzero_for_a_uniform_policy():
    # A random-init tiny model samples almost uniformly over its 250 ids; 10 are digits and ids
    # beyond the char tokenizer decode to nothing but still count as generated tokens.
    from megatron_rl.models.tiny import TINY_SHAPE, build_tokenizer

    tok = build_tokenizer()
    rng = random.Random(0)
    responses = [[rng.randrange(TINY_SHAPE["vocab_size"]) for _ in range(16)] for _ in range(500)]
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in responses]
    rewards = compute_rewards(digit_fraction, texts, prompts=["p"] * 500, samples=[{}] * 500, response_ids=responses)
    mean = sum(rewards) / len(rewards)
    assert 0.03 < mean < 0.05, mean  # expected 10 / 250 = 0.04


# -- synthetic tasks ---------------------------------------------------------------------------

def test_synthetic_rows_deterministic():
    a = synthetic_rows("digits", num_rows=50, seed=3)
    assert a == synthetic_rows("digits", num_rows=50, seed=3)
    assert a != synthetic_rows("digits", num_rows=50, seed=4)
    assert all(r["prompt"].startswith("digits ") and r["prompt"].endswith(":") for r in a)
    add = synthetic_rows("add", num_rows=20, seed=0)
    for r in add:
        x, y = r["prompt"][:-1].split("+")
        assert int(r["answer"]) == int(x) + int(y)
        assert math_answer(f"= {r['answer']}", prompt=r["prompt"], sample=r) == 1.0
    for r in synthetic_rows("copy", num_rows=20, seed=0):
        assert r["answer"] == r["prompt"][-1]
    with pytest.raises(ConfigError, match="data.dataset: unknown synthetic task 'nope'"):
        load_rows("synthetic:nope")


# -- files -------------------------------------------------------------------------------------

def test_jsonl_rows_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "q0", "answer": "1"}\n\n{"question": "q1", "answer": "2"}\n')
    rows = load_rows(str(p), prompt_key="question")
    assert [(r["prompt"], r["answer"], r["id"]) for r in rows] == [("q0", "1", 0), ("q1", "2", 1)]
    with pytest.raises(ConfigError, match=r"config error: data.prompt_key: row 0 of .* has no string field 'prompt'"):
        load_rows(str(p))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match=r"config error: data.dataset: .*bad.jsonl:2 is not valid JSON"):
        load_rows(str(bad))
    arr = tmp_path / "arr.jsonl"
    arr.write_text('["a"]\n')
    with pytest.raises(ConfigError, match=r"arr.jsonl:1 is a list, not an object"):
        load_rows(str(arr))
    with pytest.raises(ConfigError, match=r"config error: data.dataset: file '.*missing.jsonl' does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": ["1+1=", "2+2="], "answer": ["2", "4"]}), str(p))
    rows = load_rows(str(p), prompt_key="problem")
    assert [(r["prompt"], r["answer"]) for r in rows] == [("1+1=", "2"), ("2+2=", "4")]


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"config error: data.dataset: reading .*d.parquet needs pyarrow.*"
                                          r"fix: pip install pyarrow"):
        load_rows(str(p))


# -- order and resume --------------------------------------------------------------------------

def test_dataset_order_epochs_and_resume():
    rows = [{"prompt": str(i), "id": i} for i in range(10)]
    ds = PromptDataset(rows, seed=7)
    drawn = [r["id"] for _ in range(5) for r in ds.next_batch(4)]  # 20 draws = 2 epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # a new permutation per epoch
    again = PromptDataset(rows, seed=7)
    assert drawn == [r["id"] for _ in range(5) for r in again.next_batch(4)]
    assert [r["id"] for r in PromptDataset(rows, seed=7, shuffle=False).next_batch(12)] == list(range(10)) + [0, 1]

    a = PromptDataset(rows, seed=7)
    a.next_batch(7)
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store it as JSON
    after = [r["id"] for r in a.next_batch(9)]
    b = PromptDataset(rows, seed=7)
    b.load_state_dict(state)
    assert [r["id"] for r in b.next_batch(9)] == after
    with pytest.raises(ConfigError, match="config error: data: the checkpoint's dataset"):
        PromptDataset(rows[:5], seed=7).load_state_dict(state)


def test_dataset_from_config_filters_long_prompts(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": "x" * n}) for n in (3, 8, 5)) + "\n")
    ds = PromptDataset.from_config(DataConfig(dataset=str(p), max_prompt_len=5, shuffle=False), prompt_len=len)
    assert [r["prompt"] for r in ds.next_batch(2)] == ["xxx", "xxxxx"]
    with pytest.raises(ConfigError, match="config error: data.max_prompt_len: every prompt"):
        PromptDataset.from_config(DataConfig(dataset=str(p), max_prompt_len=2), prompt_len=len)
    syn = PromptDataset.from_config(DataConfig(synthetic_size=16))
    assert len(syn) == 16
