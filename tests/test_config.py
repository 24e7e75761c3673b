"""Tier 1: every YAML under configs/ loads and validates; overrides apply in order; each bad
config fails with ONE line that names the field and the fix, before any process group."""
import glob
import os
from types import SimpleNamespace

import pytest

from megatron_rl import config as config_mod
from megatron_rl.config import Config, ConfigError, load_config, parse_overrides, to_dict
from megatron_rl.models.tiny import FAMILIES, TINY_SHAPE, tiny_hf_config

pytestmark = pytest.mark.unit
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))

# Shapes of the real models the GPU configs name (from their HF config.json files).
KNOWN_SHAPES = {
    "Qwen2.5-7B-Instruct": dict(num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, num_layers=28,
                                max_position_embeddings=32768),
    "Llama-3.1-70B-Instruct": dict(num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                   num_layers=80, max_position_embeddings=131072),
}
TINY_LLAMA = dict(num_attention_heads=TINY_SHAPE["num_attention_heads"],
                  num_key_value_heads=FAMILIES["llama"]["num_key_value_heads"],
                  vocab_size=TINY_SHAPE["vocab_size"], num_layers=TINY_SHAPE["num_hidden_layers"],
                  max_position_embeddings=TINY_SHAPE["max_position_embeddings"])


# The tiny model each tiny config names (runs/<name>, built by make-tiny-model --family <family>).
TINY_FAMILIES = {"tiny-llama": "llama", "tiny-moe": "qwen3_moe"}


def _shape_for(cfg: Config) -> dict:
    name = os.path.basename(cfg.model.hf_path.rstrip("/"))
    if name.startswith("tiny-"):
        return TINY_LLAMA
    assert name in KNOWN_SHAPES, f"add the shape of {name} to KNOWN_SHAPES so its config is validated"
    return KNOWN_SHAPES[name]


def _check_shape(cfg: Config) -> None:
    """The config against its model's shape: a tiny model's whole transformers config (MoE
    included), a real model's known sizes."""
    name = os.path.basename(cfg.model.hf_path.rstrip("/"))
    if name in TINY_FAMILIES:
        cfg.check_hf_config(tiny_hf_config(TINY_FAMILIES[name]))
    else:
        cfg.check_model(**_shape_for(cfg))


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny_cpu.yaml", "gpu_7b_8gpu.yaml", "gpu_70b_64gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.parallel.world_size, "every shipped config pins parallel.world_size"
    cfg.validate(world_size=cfg.parallel.world_size, files=False)
    _check_shape(cfg)
    dp = cfg.data_parallel_size(cfg.parallel.world_size)
    assert cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp * dp == cfg.parallel.world_size


def test_shipped_layouts():
    tiny = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"))
    assert (tiny.parallel.world_size, tiny.parallel.tp) == (4, 2) and tiny.parallel.pp * tiny.parallel.tp <= 4
    assert tiny.rollout.tp != tiny.parallel.tp and tiny.parallel.world_size // tiny.rollout.tp > 1  # replicas
    tiny.check_hf_config(_tiny_hf())
    g7 = load_config(os.path.join(REPO, "configs", "gpu_7b_8gpu.yaml"))
    g70 = load_config(os.path.join(REPO, "configs", "gpu_70b_64gpu.yaml"))
    assert (g7.parallel.world_size, g7.model.dtype) == (8, "bfloat16")
    assert (g70.parallel.world_size, g70.model.dtype) == (64, "bfloat16")


def test_defaults_and_override_precedence(tmp_path):
    assert to_dict(load_config()) == to_dict(Config())
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 1e-5\n  steps: 7\nrollout:\n  tp: 2\n")
    cfg = load_config(str(y), overrides=["train.lr=1e-6", "algorithm.tis_cap=null", "logging.tensorboard=false",
                                         "data.dataset=synthetic:add", "algorithm.clip_high=0.3"])
    assert cfg.train.lr == 1e-6  # CLI beats YAML; "1e-6" (a YAML-1.1 string) becomes a float
    assert cfg.train.steps == 7 and cfg.rollout.tp == 2  # YAML beats defaults
    assert cfg.algorithm.tis_cap is None and cfg.logging.tensorboard is False
    assert cfg.data.dataset == "synthetic:add" and cfg.algorithm.clip_high == 0.3
    assert cfg.parallel.tp == 1  # untouched default
    assert parse_overrides(["a.b.c=3", "a.d=x"]) == {"a": {"b": {"c": 3}, "d": "x"}}


def _yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


def _tiny_hf(**rope):
    """The tiny llama's HF config fields (importing transformers would cost seconds); ``rope``
    replaces its plain-RoPE ``rope_parameters``."""
    params = dict(rope) if rope else {"rope_type": "default", "rope_theta": 10000.0}
    return SimpleNamespace(**TINY_SHAPE, num_key_value_heads=FAMILIES["llama"]["num_key_value_heads"],
                           rope_parameters=params)


# (name, how to build it, where the check runs, the start of the expected message)
BAD = [
    ("rollout tp not dividing world", ["rollout.tp=3"], 4,
     "config error: rollout.tp: 3 does not divide world size 4"),
    ("G < 2 for GRPO", ["algorithm.group_size=1"], None,
     "config error: algorithm.group_size: GRPO needs >= 2 samples per prompt, got 1"),
    ("unknown reward", ["data.reward=nope"], None, "config error: data.reward: unknown reward 'nope' (known: "),
    ("missing dataset file", ["data.dataset=runs/none/missing.jsonl"], "files",
     "config error: data.dataset: file 'runs/none/missing.jsonl' does not exist"),
    ("unknown key", ["train.lrr=1"], None, "config error: train.lrr: unknown key; fix: remove it; valid keys"),
    ("unknown section", ["trainer.lr=1"], None, "config error: trainer: unknown key"),
    ("wrong type int", ["parallel.tp=two"], None, "config error: parallel.tp: expected an integer, got 'two'"),
    ("wrong type bool", ["train.shared_prefix=maybe"], None,
     "config error: train.shared_prefix: expected true/false, got 'maybe'"),
    ("wrong type float", ["train.lr=fast"], None, "config error: train.lr: expected a number, got 'fast'"),
    ("tp*pp*cp not dividing world", ["parallel.tp=2", "parallel.pp=2", "parallel.cp=2"], 4,
     "config error: parallel.tp/pp/cp: tp*pp*cp = 2*2*2 = 8 does not divide world size 4"),
    ("tp not dividing kv heads", ["parallel.tp=8"], "model",
     "config error: parallel.tp: 8 does not divide num_key_value_heads (query groups)=4"),
    ("rollout tp vs kv heads", ["rollout.tp=6"], "model", "config error: rollout.tp: 6 does not divide "
                                                           "num_attention_heads=8"),
    ("negative lr", ["train.lr=-1e-5"], None, "config error: train.lr: must be > 0, got -1e-05"),
    ("sequence parallel with tp=1", ["parallel.sequence_parallel=true"], None,
     "config error: parallel.sequence_parallel: needs parallel.tp > 1"),
    ("critic key without ppo", ["algorithm.critic_lr=1e-5"], None,
     "config error: algorithm.critic_lr: is only used with algorithm.name=ppo (got name=grpo)"),
    ("critic warm-up too long", ["algorithm.name=ppo", "algorithm.critic_warmup_steps=20"], None,
     "config error: algorithm.critic_warmup_steps: 20 >= train.steps=20"),
    ("gae lambda out of range", ["algorithm.name=ppo", "algorithm.lam=1.5"], None,
     "config error: algorithm.lam: must be in [0, 1], got 1.5"),
    ("no critic passes", ["algorithm.name=ppo", "algorithm.critic_epochs=0"], None,
     "config error: algorithm.critic_epochs: must be >= 1, got 0"),
    ("value clip not positive", ["algorithm.name=ppo", "algorithm.value_clip=0"], None,
     "config error: algorithm.value_clip: must be > 0 or null"),
    ("zero gen batches", ["algorithm.max_gen_batches=0"], None, "config error: algorithm.max_gen_batches: must be >= 1"),
    ("unknown loss agg", ["algorithm.loss_agg=mean"], None, "config error: algorithm.loss_agg: unknown mode 'mean'"),
    ("tis cap below 1", ["algorithm.tis_cap=0.5"], None, "config error: algorithm.tis_cap: must be >= 1 or null"),
    ("model len too short", ["rollout.max_model_len=64", "data.max_prompt_len=60"], None,
     "config error: rollout.max_model_len: 64 < data.max_prompt_len + rollout.max_new_tokens = 60 + 32"),
    ("groups not splitting over dp", ["data.prompts_per_step=6", "algorithm.mini_batches=4"], 4,
     "config error: data.prompts_per_step: 6 groups do not split evenly over data-parallel size 4"),
    ("world size mismatch", ["parallel.world_size=8"], 4,
     "config error: parallel.world_size: config expects 8 ranks but the launch has 4"),
    ("min lr above lr", ["train.min_lr=1"], None, "config error: train.min_lr: must be in [0, train.lr="),
    ("missing model dir", ["model.hf_path=runs/none/model"], "files",
     "config error: model.hf_path: 'runs/none/model' holds no config.json"),
    ("dataset suffix", ["data.dataset=prompts.csv"], None,
     "config error: data.dataset: 'prompts.csv' is neither synthetic:<task> nor a .jsonl/.parquet file"),
    ("bad dtype", ["model.dtype=fp8"], None, "config error: model.dtype: unknown dtype 'fp8'"),
    ("context longer than model", ["rollout.max_model_len=1024"], "model",
     "config error: rollout.max_model_len: 1024 exceeds the model's max_position_embeddings=512"),
    ("section not a mapping", ["train=3"], None, "config error: train: expected a mapping, got int"),
    ("override not key=value", ["train.lr"], None, "config error: train.lr: override is not key=value"),
    ("fp16 has no loss scaling", ["model.dtype=float16"], None,
     "config error: model.dtype: float16 is not supported (no loss scaling); fix: use bfloat16"),
    ("unknown recompute", ["train.recompute=partial"], None,
     "config error: train.recompute: unknown mode 'partial'; fix: use none, full or selective"),
    ("recompute as a bool", ["train.recompute=true"], None, "config error: train.recompute: unknown mode 'True'"),
]


@pytest.mark.parametrize("name,overrides,where,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_one_clear_line(name, overrides, where, expected, tmp_path):
    model = tmp_path / "model"  # a stand-in model dir, so that only the named field is wrong
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        cfg = load_config(overrides=[f"model.hf_path={model}", *overrides])
        if where == "files":
            cfg.check_files()
        elif where == "model":
            cfg.check_hf_config(_tiny_hf())
        elif isinstance(where, int):
            cfg.check_world(where)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(expected), msg
    assert "; fix: " in msg, msg


LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)  # Llama-3.1-70B-Instruct's config.json
BAD_ROPE = [
    ("dynamic", dict(rope_type="dynamic", rope_theta=1e4, factor=2.0),
     "rope_parameters.rope_type='dynamic' is not supported; fix: use a model whose rope_type is one of default, "
     "linear, llama3, yarn"),
    ("longrope", dict(rope_type="longrope", rope_theta=1e4), "rope_parameters.rope_type='longrope' is not supported"),
    ("llama3 without factor", {k: v for k, v in LLAMA3.items() if k != "factor"},
     "rope_type='llama3' needs rope_parameters.factor; fix: add it to the HF config.json"),
    ("llama3 inverted band", dict(LLAMA3, low_freq_factor=4.0, high_freq_factor=1.0),
     "rope_parameters.low_freq_factor must be < high_freq_factor"),
    ("linear below 1", dict(rope_type="linear", rope_theta=1e4, factor=0.5), "rope_parameters.factor=0.5 must be >= 1"),
    ("yarn without original length", dict(rope_type="yarn", rope_theta=1e4, factor=4.0),
     "rope_type='yarn' needs rope_parameters.original_max_position_embeddings"),
    ("unknown key", dict(LLAMA3, beta_fast=32), "rope_parameters.beta_fast is not supported for rope_type='llama3'"),
    ("partial rotary", dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5),
     "rope_parameters.partial_rotary_factor != 1 is not supported"),
    ("no theta", dict(rope_type="default"), "rope_theta is missing; fix: set rope_parameters.rope_theta"),
]


@pytest.mark.parametrize("name,rope,expected", BAD_ROPE, ids=[b[0] for b in BAD_ROPE])
def test_bad_rope_one_line_before_launch(name, rope, expected):
    cfg = load_config(overrides=["model.hf_path=/models/m"])
    with pytest.raises(ConfigError) as e:
        cfg.check_hf_config(_tiny_hf(**rope))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config error: model.hf_path: /models/m config.json: " + expected), msg
    assert "; fix: " in msg, msg


@pytest.mark.parametrize("rope", [LLAMA3, dict(rope_type="linear", rope_theta=1e4, factor=2.0),
                                  dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                       original_max_position_embeddings=32768),
                                  dict(rope_type="default", rope_theta=1e6)], ids=lambda r: r["rope_type"])
def test_supported_rope_passes(rope):
    load_config().check_hf_config(_tiny_hf(**rope))


def test_gpu_configs_recompute_full():
    for name in ("gpu_7b_8gpu.yaml", "gpu_70b_64gpu.yaml"):
        assert load_config(os.path.join(REPO, "configs", name)).train.recompute == "full"
    assert load_config().train.recompute == "none"
    assert load_config(overrides=["train.recompute=selective"]).train.recompute == "selective"


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^config error: --config: .*bad.yaml is not valid YAML"):
        load_config(_yaml(tmp_path, "train: [1,\n"))
    with pytest.raises(ConfigError, match=r"^config error: --config: .*must hold a mapping of sections"):
        load_config(_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"^config error: --config: file 'nope.yaml' does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match=r"^config error: rollout.temprature: unknown key"):
        load_config(_yaml(tmp_path, "rollout:\n  temprature: 0.7\n"))


def test_tensorboard_requested_but_missing(monkeypatch):
    real = config_mod.importlib.util.find_spec
    monkeypatch.setattr(config_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^config error: logging.tensorboard: tensorboard is not installed; "
                                          r"fix: pip install 'megatron_rl\[metrics\]'"):
        load_config(overrides=["logging.tensorboard=true"])


def test_check_files_passes_on_real_inputs(tmp_path):
    from megatron_rl.models.tiny import tiny_hf_config

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    tiny_hf_config("llama").save_pretrained(str(tmp_path / "m"))
    cfg = load_config(overrides=[f"model.hf_path={tmp_path / 'm'}", f"data.dataset={data}"])
    cfg.validate(world_size=2, hf_config=_tiny_hf())
    assert vars(_tiny_hf()).items() <= tiny_hf_config("llama").to_dict().items()  # the stand-in is faithful


@pytest.mark.parametrize("overrides,expected", [
    (["rollout.tp=3"], "config error: rollout.tp: 3 does not divide world size 4"),
    (["model.hf_path=runs/none/model"], "config error: model.hf_path: 'runs/none/model' holds no config.json"),
    (["algorithm.group_size=1"], "config error: algorithm.group_size: GRPO needs >= 2"),
    (["algorithm.kl_coef=0.1", "algorithm.ref_hf_path=runs/none/ref"],
     "config error: algorithm.ref_hf_path: 'runs/none/ref' holds no config.json"),
])
def test_train_cli_prints_one_line_and_exits_2(overrides, expected, capsys, monkeypatch, tmp_path):
    from megatron_rl import cli

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    model = tmp_path / "model"  # only the named field is wrong
    model.mkdir()
    from megatron_rl.models.tiny import tiny_hf_config

    tiny_hf_config("llama").save_pretrained(str(model))
    args = ["train", "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), f"model.hf_path={model}", *overrides]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    import torch.distributed as dist

    assert not dist.is_initialized()  # failed before any process group


def test_rollout_dtype_defaults_to_training_dtype_and_refuses_unknown():
    from megatron_rl.config import ConfigError, load_config

    cfg = load_config(None, overrides=["model.dtype=bfloat16"])
    assert cfg.rollout.dtype == "auto" and cfg.rollout_dtype == "bfloat16"
    cfg = load_config(None, overrides=["model.dtype=float32", "rollout.dtype=bfloat16"])
    assert cfg.rollout_dtype == "bfloat16" and cfg.model.dtype == "float32"  # fp32 master, bf16 rollout
    with pytest.raises(ConfigError, match=r"^config error: rollout.dtype: unknown dtype 'float16'; fix: use auto"):
        load_config(None, overrides=["rollout.dtype=float16"])


def test_sync_section_defaults_overrides_and_refusals():
    cfg = load_config()
    assert (cfg.sync.bucket_bytes, cfg.sync.verify, cfg.sync.transport) == (64 << 20, False, "p2p")
    cfg = load_config(overrides=["sync.bucket_bytes=1048576", "sync.verify=true"])
    assert (cfg.sync.bucket_bytes, cfg.sync.verify) == (1 << 20, True)
    for bad, expected in [("sync.transport=nccl", "config error: sync.transport: unknown transport 'nccl'; fix: use p2p"),
                          ("sync.bucket_bytes=0", "config error: sync.bucket_bytes: must be >= 1, got 0"),
                          ("sync.bucket=1", "config error: sync.bucket: unknown key")]:
        with pytest.raises(ConfigError) as e:
            load_config(overrides=[bad])
        assert "\n" not in str(e.value) and str(e.value).startswith(expected), str(e.value)


def test_model_checks_come_from_the_layout_builders():
    """The config states no divisibility rule itself: a rule only the layouts know (rollout.tp must
    divide intermediate_size; vLLM's padded vocab) reaches the config line too."""
    hf = _tiny_hf()
    hf.intermediate_size = 500  # 8 heads, 4 kv heads: rollout.tp=8 divides those, not 500
    with pytest.raises(ConfigError, match=r"^config error: rollout.tp: 8 does not divide intermediate_size=500; fix: "):
        load_config(overrides=["rollout.tp=8"]).check_hf_config(hf)
    with pytest.raises(ConfigError, match=r"^config error: parallel.pp: 3 does not divide num_hidden_layers=4; fix: "):
        load_config(overrides=["parallel.pp=3"]).check_hf_config(_tiny_hf())
    load_config(overrides=["rollout.tp=8"]).check_hf_config(_tiny_hf())  # 512 rows: the same degree passes
