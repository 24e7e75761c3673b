"""Loading a :class:`~megatron_rl.config.schema.Config`: dataclass defaults <- YAML <- dotted
overrides (``train.lr=1e-5``). Values are coerced to each field's type and unknown keys are
refused by name, each failure in one line.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from megatron_rl.config.schema import Config, _fail


def _coerce(path: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, args[0])
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            _fail(path, f"expected a mapping, got {type(value).__name__}", f"write {path} as a YAML mapping")
        return _build(hint, value, path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        _fail(path, f"expected true/false, got {value!r}", f"set {path}=true or {path}=false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, f"expected an integer, got {value!r}", f"set {path} to an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}", f"set {path} to a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            _fail(where, "unknown key", f"remove it; valid keys here are {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(where, value, hints[key])
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            _fail(dotted, f"{part} is not a section", "override a leaf such as train.lr=1e-5")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-5", "rollout.tp=2"]`` -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            _fail(item, "override is not key=value", "write overrides as section.key=value, e.g. train.lr=1e-5")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str] = None, *, overrides: Optional[list[str]] = None) -> Config:
    """Build a validated :class:`Config` from defaults, an optional YAML file and overrides."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            _fail("--config", f"file {path!r} does not exist", "pass an existing YAML file, e.g. configs/tiny_cpu.yaml")
        with open(path) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                _fail("--config", f"{path} is not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax")
        if not isinstance(loaded, dict):
            _fail("--config", f"{path} must hold a mapping of sections", "write sections such as model:, parallel:")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return _build(Config, data)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
