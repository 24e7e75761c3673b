"""Typed configuration for megatron_rl.

Every default lives in a dataclass (:mod:`.schema`); YAML files only override them, and
dotted command-line overrides (``train.lr=1e-6``) override the YAML (:mod:`.load`). Unknown
keys are rejected by name. Each section validates itself in ``__post_init__``; checks that
need outside facts (the launch, the model's shape, the files) run in one function,
:func:`validate` (:mod:`.checks`), which calls the layout builders rather than restating
their rules. All of them run before any process group exists, and each failure is one line:
``config error: <field>: <problem>; fix: <fix>``.

Usage::

    cfg = load_config("configs/tiny_cpu.yaml", overrides=["train.lr=1e-5"])
    hf_config = validate(cfg, world_size=4, load_hf=True)
"""
from __future__ import annotations

import importlib.util  # noqa: F401  (tests patch importlib.util.find_spec through this module)

from megatron_rl.config.checks import check_files, check_hf_config, check_model, check_world, validate
from megatron_rl.config.load import load_config, parse_overrides, to_dict
from megatron_rl.config.schema import (TRANSPORTS, AlgorithmConfig, CheckpointConfig, Config, DataConfig,
                                       LoggingConfig, ModelConfig, ParallelConfig, RolloutConfig, SyncConfig,
                                       TrainConfig)
from megatron_rl.errors import ConfigError

__all__ = ["Config", "ConfigError", "ModelConfig", "ParallelConfig", "RolloutConfig", "AlgorithmConfig", "DataConfig",
           "TrainConfig", "SyncConfig", "CheckpointConfig", "LoggingConfig", "TRANSPORTS", "load_config",
           "parse_overrides", "to_dict", "validate", "check_world", "check_model", "check_hf_config", "check_files"]
