"""The config schema: one dataclass per section, every default, each section checked in its
own ``__post_init__`` (no outside facts). Checks that need the launch, the model or the
filesystem live in :mod:`megatron_rl.config.checks`; loading YAML in :mod:`.load`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Optional

from megatron_rl.config import checks as _checks
from megatron_rl.data.synthetic import ADDITION_MAX, TASKS
from megatron_rl.errors import config_error
from megatron_rl.rewards import get_reward

TRANSPORTS = ("p2p",)  # sync.transport names; megatron_rl.resharding.sync maps each to its class


def _fail(field_name: str, problem: str, fix: str) -> None:
    raise config_error(field_name, problem, fix)


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
    ep: int = 1  # expert parallelism (MoE models only): experts split over ep ranks taken from cp x dp
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    world_size: Optional[int] = None  # if set, the launch must match it exactly
    backend: str = "auto"  # auto (nccl on CUDA, gloo otherwise) | gloo | nccl
    timeout_s: float = 300.0  # every collective in our code runs under this timeout

    def __post_init__(self):
        _positive("parallel", tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep)
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
    """Policy optimisation: critic-free (GRPO family) or PPO with a value model, all with the PPO clipped loss."""

    name: str = "grpo"  # grpo (group-mean baseline) | rloo (leave-one-out baseline) | ppo (critic + GAE)
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
    mini_batches: int = 1  # optimizer steps per rollout batch and epoch; > 1 makes the PPO clip bite
    ppo_epochs: int = 1  # passes over one rollout batch (each pass: every mini-batch once)
    # PPO only (algorithm.name=ppo): the critic and GAE. With ppo, kl_coef > 0 puts the KL in the per-token
    # rewards (InstructGPT-style) instead of the loss.
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    value_clip: Optional[float] = 0.2  # clipped value loss range around the old values; None: unclipped
    whiten_advantages: bool = True  # whiten the GAE advantages over all tokens of the step
    critic_lr: Optional[float] = None  # the critic's learning rate; None = train.lr (same schedule)
    critic_hf_path: Optional[str] = None  # the critic's initial HF weights; None = model.hf_path
    critic_warmup_steps: int = 0  # first steps train the critic only (the policy is not updated)
    # the critic's passes over one rollout (each: every mini-batch once). A critic starts from the policy's
    # features, which need not encode the value: one pass per rollout leaves its explained variance near 0.
    critic_epochs: int = 4
    # DAPO dynamic sampling: drop groups whose rewards all agree and sample more rollout batches until
    # data.prompts_per_step groups are kept, at most max_gen_batches per step (then topped up with dropped groups).
    dynamic_sampling: bool = False
    max_gen_batches: int = 4
    # MoE only: training replays the experts the rollout routed each token to (R3) instead of its own top-k
    routing_replay: bool = False

    def __post_init__(self):
        if self.name not in ("grpo", "rloo", "ppo"):
            _fail("algorithm.name", f"unknown algorithm {self.name!r}", "use grpo, rloo or ppo")
        self._check_ppo()
        if self.group_size < 1 or (self.group_size < 2 and self.name != "ppo"):
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
        _positive("algorithm", mini_batches=self.mini_batches, ppo_epochs=self.ppo_epochs,
                  max_gen_batches=self.max_gen_batches, critic_epochs=self.critic_epochs)

    def _check_ppo(self) -> None:
        if self.name != "ppo":
            for key, value in (("critic_hf_path", self.critic_hf_path), ("critic_lr", self.critic_lr),
                               ("critic_warmup_steps", self.critic_warmup_steps or None)):
                if value is not None:
                    _fail(f"algorithm.{key}", f"is only used with algorithm.name=ppo (got name={self.name})",
                          f"set algorithm.name=ppo or remove algorithm.{key}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                _fail(f"algorithm.{key}", f"must be in [0, 1], got {getattr(self, key)}", "use e.g. 1.0 / 0.95")
        if self.value_clip is not None and self.value_clip <= 0:
            _fail("algorithm.value_clip", f"must be > 0 or null, got {self.value_clip}", "use e.g. 0.2")
        if self.critic_lr is not None and self.critic_lr <= 0:
            _fail("algorithm.critic_lr", f"must be > 0 or null, got {self.critic_lr}", "use e.g. 1e-5")
        if self.critic_warmup_steps < 0:
            _fail("algorithm.critic_warmup_steps", "must be >= 0", "use 0 for no critic-only steps")


@dataclass
class DataConfig:
    """Prompts and rewards."""

    dataset: str = "synthetic:digits"  # synthetic:<digits|copy|add|addition> or a .jsonl / .parquet path
    prompt_key: str = "prompt"  # the column holding the prompt text
    reward: str = "digit_fraction"  # a name in megatron_rl.rewards' registry, or package.module:function
    prompts_per_step: int = 8
    max_prompt_len: int = 64  # tokens; longer prompts are dropped when the dataset loads
    shuffle: bool = True  # a seeded permutation per epoch (deterministic, resumable)
    synthetic_size: int = 1024  # rows of a synthetic dataset
    seed: int = 1234
    chat_template: bool = False  # prompts as one user turn of the tokenizer's chat template (instruct models)
    # Held-out evaluation (run every logging.eval_every steps; see megatron_rl/evaluation.py). No
    # training row has an eval prompt: they are dropped from the training set (megatron_rl.data.load_split).
    eval_dataset: Optional[str] = None  # the eval prompts (synthetic:<task>, .jsonl, .parquet); None: hold out of dataset
    eval_size: int = 0  # rows held out of data.dataset (or the first rows of eval_dataset; 0 = all of it)
    eval_pass_k: int = 0  # also pass@k from k sampled responses per prompt (2 <= k <= group_size); 0: greedy only

    def __post_init__(self):
        _positive("data", prompts_per_step=self.prompts_per_step, max_prompt_len=self.max_prompt_len,
                  synthetic_size=self.synthetic_size)
        for key in ("dataset", "eval_dataset"):
            _check_dataset(f"data.{key}", getattr(self, key))
        if self.eval_size < 0:
            _fail("data.eval_size", f"{self.eval_size} < 0", "use 0 (none held out) or a positive row count")
        if not self.eval_dataset and self.eval_size and self.dataset.startswith("synthetic:") \
                and self.eval_size >= self.synthetic_size:
            _fail("data.eval_size", f"{self.eval_size} >= data.synthetic_size={self.synthetic_size} leaves no "
                  "training rows", "lower data.eval_size or raise data.synthetic_size")
        if self.dataset == "synthetic:addition" and self.synthetic_size > ADDITION_MAX ** 2:
            _fail("data.synthetic_size", f"{self.synthetic_size} > the {ADDITION_MAX ** 2} distinct addition prompts",
                  f"use data.synthetic_size <= {ADDITION_MAX ** 2}")
        if self.eval_pass_k == 1 or self.eval_pass_k < 0:
            _fail("data.eval_pass_k", f"{self.eval_pass_k}: greedy pass@1 is always measured",
                  "use 0 (off) or k >= 2 sampled responses per prompt")
        get_reward(self.reward)  # fails naming data.reward and the known names


def _check_dataset(key: str, value: Optional[str]) -> None:
    if value is None and key == "data.eval_dataset":
        return
    if value.startswith("synthetic:"):
        if value.split(":", 1)[1] not in TASKS:
            _fail(key, f"unknown synthetic task {value!r}", "use one of " + ", ".join("synthetic:" + t for t in TASKS))
    elif not value.endswith((".jsonl", ".parquet")):
        _fail(key, f"{value!r} is neither synthetic:<task> nor a .jsonl/.parquet file",
              "use synthetic:digits or a path ending in .jsonl or .parquet")


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
class SyncConfig:
    """Live weight sync, trainer -> rollout (:class:`megatron_rl.resharding.sync.WeightSync`)."""

    bucket_bytes: int = 64 << 20  # per rank and bucket: bytes written, and the transfer buffers (the planner's bound)
    # Destination shards a rank may hold open (staged, not yet complete) at once. 0: automatic:
    # no bound with rollout.weights_release=discard (a staged shard IS the new weight, handed to
    # vLLM without a copy), bucket_bytes / 2 with offload (a staged shard is a copy beside vLLM's).
    staging_bytes: int = 0
    verify: bool = False  # compare per-slice checksums after every sync (one small all-reduce each)
    transport: str = "p2p"  # p2p: torch.distributed batch_isend_irecv (the one transport today)

    def __post_init__(self):
        _positive("sync", bucket_bytes=self.bucket_bytes)
        if self.staging_bytes < 0:
            _fail("sync.staging_bytes", f"must be >= 0, got {self.staging_bytes}", "use 0 (automatic) or a byte count")
        if self.transport not in TRANSPORTS:
            _fail("sync.transport", f"unknown transport {self.transport!r}", "use " + " or ".join(TRANSPORTS))


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
    eval_every: int = 0  # steps between held-out evaluations (also at the start and the end); 0: none (needs data.eval_*)
    # false: the launch scripts keep every rank's output (vLLM, torch, warnings) in <run_dir>/logs and
    # the console shows rank 0's progress bar, tables and messages, and errors; true: rank 0's whole
    # output on the console too (torchrun --tee, "[default0]:" prefixes). See megatron_rl/console.py.
    verbose: bool = False
    # MoE only: log moe/route_mismatch, the share of routing decisions (token, layer) where training's own
    # top-k differs from the rollout's expert set (the rollout then returns its routes)
    route_mismatch: bool = False

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
    sync: SyncConfig = field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        d, r = self.data, self.rollout
        if d.max_prompt_len + r.max_new_tokens > r.max_model_len:
            _fail("rollout.max_model_len", f"{r.max_model_len} < data.max_prompt_len + rollout.max_new_tokens = "
                  f"{d.max_prompt_len} + {r.max_new_tokens}", "raise rollout.max_model_len or shorten prompts/responses")
        if self.parallel.world_size is not None:
            self.check_world(self.parallel.world_size)
        a = self.algorithm
        self._check_eval()
        if a.routing_replay and self.train.recompute == "full":
            _fail("algorithm.routing_replay", "with train.recompute=full (the recomputed routers would not replay)",
                  "use train.recompute=selective or none")
        if self.logging.route_mismatch and self.train.recompute == "full":
            _fail("logging.route_mismatch", "with train.recompute=full (recompute would count twice)",
                  "use train.recompute=selective or none")
        if a.critic_warmup_steps >= self.train.steps:
            _fail("algorithm.critic_warmup_steps", f"{a.critic_warmup_steps} >= train.steps={self.train.steps}: the "
                  "policy would never train", "use fewer critic-only steps than train.steps")

    def _check_eval(self) -> None:
        d, every = self.data, self.logging.eval_every
        held_out = bool(d.eval_dataset or d.eval_size)
        if every < 0:
            _fail("logging.eval_every", f"{every} < 0", "use 0 (no evaluation) or a step count")
        if every and not held_out:
            _fail("logging.eval_every", f"{every} but there is no eval set",
                  "set data.eval_size=N (rows held out of data.dataset) or data.eval_dataset=PATH")
        if held_out and not every:
            key = "data.eval_dataset" if d.eval_dataset else "data.eval_size"
            _fail(key, "names an eval set but logging.eval_every=0 never runs it",
                  "set logging.eval_every=N, or unset data.eval_dataset and data.eval_size")
        if d.eval_pass_k > self.algorithm.group_size:
            _fail("data.eval_pass_k", f"{d.eval_pass_k} > algorithm.group_size={self.algorithm.group_size}",
                  "use k <= algorithm.group_size")
        if d.eval_pass_k and not every:
            _fail("data.eval_pass_k", "is set but logging.eval_every=0 never evaluates", "set logging.eval_every=N")

    @property
    def rollout_dtype(self) -> str:
        """vLLM's dtype: ``rollout.dtype``, or the training dtype when it is ``auto``."""
        return self.model.dtype if self.rollout.dtype == "auto" else self.rollout.dtype

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.parallel.model_parallel_size

    # The checks of megatron_rl.config.checks, as methods.
    def validate(self, *, world_size: int, hf_config=None, files: bool = True) -> None:
        _checks.validate(self, world_size=world_size, hf_config=hf_config, files=files)

    def check_world(self, world_size: int) -> None:
        _checks.check_world(self, world_size)

    def check_model(self, **dims) -> None:
        _checks.check_model(self, **dims)

    def check_hf_config(self, hf_config) -> None:
        _checks.check_hf_config(self, hf_config)

    def check_files(self) -> None:
        _checks.check_files(self)
