"""Synthetic prompt tasks, generated deterministically from a seed (nothing to download).

- ``digits``: a random lowercase prompt; reward ``digit_fraction`` (share of digit tokens in
  the response). A random-init char-level model starts near 10/250 = 0.04 per token and
  learns it within a few dozen GRPO steps: the demo task.
- ``copy``: a random lowercase prompt whose last character is the target; reward ``copy_last``.
  Starts near 1/250, so it learns more slowly.
- ``add``: ``"12+7="`` with answer ``"19"``; reward ``math_answer``. A verifiable task of the
  GSM8K shape, too hard for the tiny model but useful to exercise the plumbing.

Usage::

    rows = synthetic_rows("digits", num_rows=256, seed=0)   # [{"prompt": ..., "answer": ...}, ...]
"""
from __future__ import annotations

import random
import string

TASKS = ("digits", "copy", "add")
DEFAULT_REWARD = {"digits": "digit_fraction", "copy": "copy_last", "add": "math_answer"}


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def synthetic_rows(task: str, *, num_rows: int, seed: int) -> list[dict]:
    """``num_rows`` rows of ``task``; the same (task, num_rows, seed) always gives the same rows."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; use one of {TASKS}")
    rng = random.Random(f"{task}:{seed}")
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
