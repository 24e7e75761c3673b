"""Synthetic prompt tasks, generated deterministically from a seed (nothing to download).

- ``digits``: a random lowercase prompt; reward ``digit_fraction`` (share of digit tokens in
  the response). A random-init char-level model starts near 10/250 = 0.04 per token and
  learns it within a few dozen GRPO steps: the demo task.
- ``copy``: a random lowercase prompt whose last character is the target; reward ``copy_last``.
  Starts near 1/250, so it learns more slowly.
- ``add``: ``"12+7="`` with answer ``"19"``; reward ``math_answer``. A verifiable task of the
  GSM8K shape, too hard for the tiny model but useful to exercise the plumbing.
- ``addition``: two-digit addition ``"47+38="`` -> ``"85"``, every ordered pair (a, b) with
  0 <= a, b < 100 at most once (10,000 distinct prompts, in a seeded order); reward
  ``exact_match``. The SFT-then-RL demo task: a short SFT phase teaches the tiny model part of
  it, GRPO with the exact-match reward then raises its held-out accuracy.

Usage::

    rows = synthetic_rows("digits", num_rows=256, seed=0)   # [{"prompt": ..., "answer": ...}, ...]
"""
from __future__ import annotations

import random
import string

TASKS = ("digits", "copy", "add", "addition")
DEFAULT_REWARD = {"digits": "digit_fraction", "copy": "copy_last", "add": "math_answer",
                  "addition": "exact_match"}
ADDITION_MAX = 100  # operands of the addition task are < this


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def synthetic_rows(task: str, *, num_rows: int, seed: int) -> list[dict]:
    """``num_rows`` rows of ``task``; the same (task, num_rows, seed) always gives the same rows."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; use one of {TASKS}")
    rng = random.Random(f"{task}:{seed}")
    if task == "addition":
        return _addition(rng, num_rows)
    rows = []
    for i in range(num_rows):
        if task == "digits":
            rows.append({"prompt": f"digits {_letters(rng, 4, 12)}:", "answer": ""})
        elif task == "copy":
            body = _letters(rng, 4, 12)
            rows.append({"prompt": f"copy {body}", "answer": body[-1]})
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
        rows[-1]["id"] = i
    return rows


def _addition(rng: random.Random, num_rows: int) -> list[dict]:
    pairs = ADDITION_MAX * ADDITION_MAX
    if num_rows > pairs:
        raise ValueError(f"the addition task has {pairs} distinct prompts; asked for {num_rows}")
    # distinct pairs: a prompt appears once, so a held-out split by row is one by prompt too
    codes = rng.sample(range(pairs), num_rows)
    return [{"prompt": f"{c // ADDITION_MAX}+{c % ADDITION_MAX}=", "answer": str(c // ADDITION_MAX + c % ADDITION_MAX),
             "id": i} for i, c in enumerate(codes)]
