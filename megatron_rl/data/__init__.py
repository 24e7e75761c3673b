"""Prompt datasets: synthetic tasks, JSONL and parquet files, in a deterministic resumable order.

Every rank builds the same dataset and draws the same batches (SPMD), so the position is one
small state that a checkpoint saves and restores.

Usage::

    ds = PromptDataset.from_config(cfg.data)           # the training rows (never a held-out prompt)
    held_out = load_split(cfg.data).eval                 # data.eval_*: the evaluation prompts
    batch = ds.next_batch(cfg.data.prompts_per_step)     # list of row dicts, each with "prompt"
    ids = encode_prompt(tok, batch[0]["prompt"], chat_template=cfg.data.chat_template)   # see .chat
    state = ds.state_dict(); ...; ds.load_state_dict(state)
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_rl.errors import ConfigError
from megatron_rl.data.chat import encode_prompt
from megatron_rl.data.synthetic import DEFAULT_REWARD, TASKS, synthetic_rows

__all__ = ["PromptDataset", "Split", "encode_prompt", "load_rows", "load_split", "read_jsonl", "read_parquet", "synthetic_rows", "TASKS", "DEFAULT_REWARD"]


def _err(field: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"config error: {field}: {problem}; fix: {fix}")


def read_jsonl(path: str) -> list[dict]:
    """One JSON object per non-empty line; a bad line fails naming ``path:line``."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _err("data.dataset", f"{path}:{lineno} is not valid JSON ({e.msg})",
                           "write one JSON object per line") from None
            if not isinstance(row, dict):
                raise _err("data.dataset", f"{path}:{lineno} is a {type(row).__name__}, not an object",
                           'write one JSON object per line, e.g. {"prompt": "..."}')
            rows.append(row)
    return rows


def read_parquet(path: str) -> list[dict]:
    """All rows of a parquet file as dicts (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq  # lazy: optional (the data extra), parquet datasets only
    except ImportError:
        raise _err("data.dataset", f"reading {path} needs pyarrow, which is not installed",
                   "pip install pyarrow==26.0.1 (or megatron_rl[data]), or convert the file to .jsonl") from None
    return pq.read_table(path).to_pylist()


def load_rows(dataset: str, *, prompt_key: str = "prompt", synthetic_size: int = 1024, seed: int = 0) -> list[dict]:
    """Rows of ``dataset``: ``synthetic:<task>``, a ``.jsonl`` file or a ``.parquet`` file.

    Every row gets ``"prompt"`` (copied from ``prompt_key``) and ``"id"`` (its index in the file).
    """
    if dataset.startswith("synthetic:"):
        task = dataset.split(":", 1)[1]
        if task not in TASKS:
            raise _err("data.dataset", f"unknown synthetic task {task!r}", f"use one of synthetic:{', synthetic:'.join(TASKS)}")
        return synthetic_rows(task, num_rows=synthetic_size, seed=seed)
    if not os.path.isfile(dataset):
        raise _err("data.dataset", f"file {dataset!r} does not exist",
                   "point data.dataset at a .jsonl or .parquet file, or use synthetic:digits")
    if dataset.endswith(".jsonl"):
        rows = read_jsonl(dataset)
    elif dataset.endswith(".parquet"):
        rows = read_parquet(dataset)
    else:
        raise _err("data.dataset", f"{dataset!r} is neither .jsonl nor .parquet", "convert it to one of those")
    if not rows:
        raise _err("data.dataset", f"{dataset} has no rows", "point data.dataset at a non-empty file")
    for i, row in enumerate(rows):
        if prompt_key not in row or not isinstance(row[prompt_key], str):
            raise _err("data.prompt_key", f"row {i} of {dataset} has no string field {prompt_key!r} "
                       f"(fields: {sorted(row)})", "set data.prompt_key to the column holding the prompt text")
        row["prompt"] = row[prompt_key]
        row.setdefault("id", i)
    return rows


@dataclass
class Split:
    """The training rows and the held-out evaluation rows; no prompt is in both."""

    train: list[dict]
    eval: list[dict]


def _fit(rows: list[dict], *, prompt_len: Optional[Callable[[str], int]], max_len: int, what: str) -> list[dict]:
    if prompt_len is None:
        return rows
    kept = [r for r in rows if prompt_len(r["prompt"]) <= max_len]
    if not kept:
        raise _err("data.max_prompt_len", f"every prompt of {what} is longer than {max_len} tokens",
                   "raise data.max_prompt_len")
    return kept


def load_split(data_cfg, *, prompt_len: Optional[Callable[[str], int]] = None) -> Split:
    """``data.dataset``'s rows split into training and held-out evaluation rows.

    - ``data.eval_dataset`` set: its rows (the first ``data.eval_size`` when > 0) are the eval set;
    - else ``data.eval_size`` > 0: that many rows of ``data.dataset``, drawn by a seeded
      permutation (``data.seed``), are held out;
    - else no eval set.

    Every training row whose prompt text is also an eval prompt is dropped, so training never
    sees a held-out prompt (also when the two sets come from different files). With
    ``prompt_len``, prompts longer than ``data.max_prompt_len`` are dropped from both.
    """
    rows = load_rows(data_cfg.dataset, prompt_key=data_cfg.prompt_key, synthetic_size=data_cfg.synthetic_size,
                     seed=data_cfg.seed)
    held: list[dict] = []
    if data_cfg.eval_dataset:
        held = load_rows(data_cfg.eval_dataset, prompt_key=data_cfg.prompt_key, synthetic_size=data_cfg.synthetic_size,
                         seed=data_cfg.seed + 1)  # a synthetic eval set: another draw of the task
        held = held[:data_cfg.eval_size] if data_cfg.eval_size else held
    elif data_cfg.eval_size:
        if data_cfg.eval_size >= len(rows):
            raise _err("data.eval_size", f"{data_cfg.eval_size} held-out rows leave none of {data_cfg.dataset}'s "
                       f"{len(rows)} for training", "lower data.eval_size (or raise data.synthetic_size)")
        order = list(range(len(rows)))
        random.Random(f"eval:{data_cfg.seed}").shuffle(order)
        held = [rows[i] for i in sorted(order[:data_cfg.eval_size])]
    held_prompts = {r["prompt"] for r in held}
    train = [r for r in rows if r["prompt"] not in held_prompts]
    if not train:
        raise _err("data.eval_dataset", f"every prompt of {data_cfg.dataset} is also in {data_cfg.eval_dataset}",
                   "hold out another set of prompts")
    train = _fit(train, prompt_len=prompt_len, max_len=data_cfg.max_prompt_len, what=data_cfg.dataset)
    held = _fit(held, prompt_len=prompt_len, max_len=data_cfg.max_prompt_len,
                what=data_cfg.eval_dataset or "the held-out rows") if held else held
    return Split(train=train, eval=held)


class PromptDataset:
    """Rows drawn in a fixed order: a seeded permutation per epoch (or file order), forever.

    The position (epoch, index) is the whole state, so a resumed run draws exactly the batches
    the uninterrupted run would have drawn.
    """

    def __init__(self, rows: list[dict], *, seed: int = 0, shuffle: bool = True):
        if not rows:
            raise ValueError("PromptDataset needs at least one row")
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    @classmethod
    def from_config(cls, data_cfg, *, prompt_len: Optional[Callable[[str], int]] = None) -> "PromptDataset":
        """Build from a ``DataConfig``: the training rows of :func:`load_split` (no held-out
        prompt); with ``prompt_len`` (e.g. a tokenizer's length), prompts longer than
        ``data.max_prompt_len`` are dropped, and it fails if none is left."""
        return cls(load_split(data_cfg, prompt_len=prompt_len).train, seed=data_cfg.seed, shuffle=data_cfg.shuffle)

    def __len__(self) -> int:
        return len(self.rows)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[dict]:
        """The next ``n`` rows, crossing into the next epoch (a new permutation) as needed."""
        out = []
        while len(out) < n:
            if self.index == len(self.rows):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), len(self.rows) - self.index)
            out.extend(self.rows[i] for i in self._order[self.index:self.index + take])
            self.index += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`; fails if the dataset changed."""
        mine = (self.seed, self.shuffle, len(self.rows))
        theirs = (state["seed"], state["shuffle"], state["num_rows"])
        if mine != theirs:
            raise _err("data", f"the checkpoint's dataset (seed, shuffle, rows) = {theirs} differs from this run's {mine}",
                       "resume with the same data.dataset, data.seed and data.shuffle, or start a fresh run")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
