"""Reward functions: a registry by name, and rule-based verifiable rewards.

A reward function scores one response::

    fn(response: str, *, prompt: str, sample: dict, response_ids: Sequence[int] | None) -> float

``sample`` is the dataset row the prompt came from (e.g. it holds ``"answer"``);
``response_ids`` are the generated token ids, when the caller has them. Register your own::

    @register_reward("my_reward")
    def my_reward(response, *, prompt, sample, response_ids=None):
        return float(response.strip() == sample["answer"])

``data.reward`` names a registered reward, or ``package.module:function`` to import one.
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Callable, Optional, Sequence

from megatron_rl.errors import ConfigError

RewardFn = Callable[..., float]

# The one registry of reward names, filled by @register_reward at import time.
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available as ``data.reward: <name>``. Names are unique."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered (by {_REGISTRY[name].__module__}); pick another name")
        _REGISTRY[name] = fn
        return fn

    return wrap


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str, *, field: str = "data.reward") -> RewardFn:
    """The reward function called ``name`` (registered, or ``module:function``)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config error: {field}: cannot import {name!r} ({e}); "
                              "fix: use package.module:function on the PYTHONPATH") from None
        if not callable(fn):
            raise ConfigError(f"config error: {field}: {name!r} is not callable; fix: point it at a function")
        return fn
    raise ConfigError(f"config error: {field}: unknown reward {name!r} (known: {', '.join(reward_names())}); "
                      f"fix: set {field} to a known name, or to package.module:function")


def compute_rewards(fn: RewardFn, responses: Sequence[str], *, prompts: Sequence[str], samples: Sequence[dict],
                    response_ids: Optional[Sequence[Sequence[int]]] = None) -> list[float]:
    """Score a batch: element i is ``fn(responses[i], prompt=prompts[i], sample=samples[i], ...)``."""
    if not len(responses) == len(prompts) == len(samples):
        raise ValueError(f"lengths differ: {len(responses)} responses, {len(prompts)} prompts, {len(samples)} samples")
    out = []
    for i, resp in enumerate(responses):
        ids = None if response_ids is None else response_ids[i]
        value = float(fn(resp, prompt=prompts[i], sample=samples[i], response_ids=ids))
        if not math.isfinite(value):
            raise ValueError(f"reward returned {value} for response {i}; rewards must be finite")
        out.append(value)
    return out


# ---------------------------------------------------------------------------------------------
# Dense synthetic rewards (a random-init model can learn them in minutes).


def _fraction(response: str, response_ids: Optional[Sequence[int]], hit: Callable[[str], bool]) -> float:
    # Per generated token when ids are given (a char-level tokenizer decodes a token to at most
    # one character, and ids outside the tokenizer decode to nothing), else per character.
    n = len(response_ids) if response_ids is not None else len(response)
    return min(1.0, sum(1 for c in response if hit(c)) / n) if n else 0.0


@register_reward("digit_fraction")
def digit_fraction(response: str, *, prompt: str = "", sample: Optional[dict] = None,
                   response_ids: Optional[Sequence[int]] = None) -> float:
    """Share of the response that is decimal digits, in [0, 1]. The synthetic ``digits`` task."""
    return _fraction(response, response_ids, str.isdigit)


@register_reward("copy_last")
def copy_last(response: str, *, prompt: str, sample: Optional[dict] = None,
              response_ids: Optional[Sequence[int]] = None) -> float:
    """Share of the response equal to the prompt's last character (``sample["answer"]`` if set)."""
    target = (sample or {}).get("answer") or prompt[-1:]
    return _fraction(response, response_ids, lambda c: c == target) if target else 0.0


# ---------------------------------------------------------------------------------------------
# Verifiable rewards (1.0 right, 0.0 wrong).

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _answer(sample: Optional[dict], field: str = "answer") -> str:
    if not sample or field not in sample:
        raise KeyError(f"this reward needs the dataset rows to hold {field!r} (the reference answer)")
    return str(sample[field])


def extract_final_number(text: str) -> Optional[float]:
    """The answer a response commits to: the last ``\\boxed{...}`` if any, else its last number."""
    boxed = _BOXED.findall(text)
    candidates = _NUMBER.findall(boxed[-1]) if boxed else _NUMBER.findall(text)
    if not candidates:
        return None
    try:
        return float(candidates[-1].replace(",", ""))
    except ValueError:
        return None


@register_reward("math_answer")
def math_answer(response: str, *, prompt: str = "", sample: Optional[dict] = None,
                response_ids: Optional[Sequence[int]] = None) -> float:
    """1.0 if the response's final number equals ``sample["answer"]`` numerically (GSM8K style)."""
    got = extract_final_number(response)
    want = extract_final_number(_answer(sample))
    return float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))


@register_reward("exact_match")
def exact_match(response: str, *, prompt: str = "", sample: Optional[dict] = None,
                response_ids: Optional[Sequence[int]] = None) -> float:
    """1.0 if the response equals ``sample["answer"]`` up to surrounding whitespace and case."""
    return float(response.strip().lower() == _answer(sample).strip().lower())
