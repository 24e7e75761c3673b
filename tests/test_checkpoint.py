"""Tier 1: checkpoint validation, atomic writes and the export plan (no processes).

Every bad input must fail in the launching process, before any rank starts, with ONE line that
names the file or field and the fix; the texts are asserted. An exception mid-write must leave
no output directory. The tests that spawn a process (the script's --help, a real SIGKILL
mid-write) are in tests/test_checkpoint_process.py.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rl.checkpoint import convert
from megatron_rl.checkpoint import hf as hfio
from megatron_rl.checkpoint import publish
from megatron_rl.checkpoint import megatron as mio
from megatron_rl.models.tiny import make_tiny_model
from megatron_rl.parallel.grid import RankGrid
from megatron_rl.models.shape import ModelShape
from megatron_rl.resharding.layout import megatron_layout

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def models(tiny_models):
    return {f: tiny_models[f] for f in ("llama", "qwen2")}


def _copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    if config_changes:
        path = os.path.join(dst, "config.json")
        cfg = json.load(open(path))
        cfg.update(config_changes)
        json.dump(cfg, open(path, "w"))
    return str(dst)


def _fake_megatron(src_hf, dst, **meta_changes):
    """A Megatron checkpoint directory as far as validation reads it (no tensors)."""
    os.makedirs(os.path.join(dst, mio.HF_SUBDIR))
    hfio.copy_hf_extras(src_hf, os.path.join(dst, mio.HF_SUBDIR))
    shape = hfio.open_hf(src_hf).shape
    meta = dict(tp=2, pp=2, vocab_divisible_by=128, padded_vocab=256, param_dtype="float32", hf_dtype="float32",
                shape=dict(shape.__dict__), versions={})
    meta.update(meta_changes)
    mio.write_meta(str(dst), mio.MegatronMeta(**meta))
    open(os.path.join(dst, "metadata.json"), "w").write('{"sharded_backend": "torch_dist"}')
    return str(dst)


def _run_bad(argv, capsys, monkeypatch):
    """Run the CLI; it must fail before launching anything, with exactly one error line."""
    def no_launch(*a, **k):
        raise AssertionError("torchrun was launched for a bad input")
    monkeypatch.setattr(convert, "_torchrun", no_launch)
    capsys.readouterr()
    rc = convert.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith("error: ") and "; fix: " in err[0], err[0]
    return err[0]


def test_bad_inputs_fail_before_work_with_one_clear_line(models, tmp_path, capsys, monkeypatch):
    llama, qwen2 = models["llama"], models["qwen2"]
    out = str(tmp_path / "out")
    h2m = ["hf-to-megatron", "--out", out]
    cases = {}
    # 1. TP that does not divide the query groups (qwen2 has 2 kv heads).
    cases["tp vs groups"] = (h2m + ["--src", qwen2, "--tp", "4"], ["--tp 4", "num_query_groups=2", "fix: choose a tp"])
    # 2. PP that does not divide the layers.
    cases["pp vs layers"] = (h2m + ["--src", llama, "--tp", "1", "--pp", "3"], ["--pp 3", "num_hidden_layers=4"])
    # 3. Unknown architecture.
    mistral = _copy(llama, tmp_path / "mistral", architectures=["MistralForCausalLM"])
    cases["architecture"] = (h2m + ["--src", mistral, "--tp", "1"],
                             ["mistral/config.json: architectures", "'MistralForCausalLM'", "LlamaForCausalLM"])
    # 4. Vocab mismatch between config and embedding.
    vocab = _copy(llama, tmp_path / "vocab", vocab_size=300)
    cases["vocab"] = (h2m + ["--src", vocab, "--tp", "1"], ["config.json: vocab_size", "vocab mismatch", "250 rows"])
    # 5. Truncated safetensors.
    trunc = _copy(llama, tmp_path / "trunc")
    with open(os.path.join(trunc, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(trunc, "model.safetensors")) // 2)
    cases["truncated"] = (h2m + ["--src", trunc, "--tp", "1"], ["trunc/model.safetensors", "truncated or corrupt"])
    # 6. Missing weights file, and a missing directory.
    nofile = _copy(llama, tmp_path / "nofile")
    os.remove(os.path.join(nofile, "model.safetensors"))
    cases["missing file"] = (h2m + ["--src", nofile, "--tp", "1"], ["nofile/model.safetensors", "missing"])
    cases["missing dir"] = (h2m + ["--src", str(tmp_path / "nope"), "--tp", "1"], ["nope", "does not exist"])
    # 7. A missing tensor, and a mis-shaped one (config disagrees with the weights).
    notensor = _copy(llama, tmp_path / "notensor")
    sd = load_file(os.path.join(llama, "model.safetensors"))
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, os.path.join(notensor, "model.safetensors"), metadata={"format": "pt"})
    cases["missing tensor"] = (h2m + ["--src", notensor, "--tp", "1"], ["'model.layers.2.mlp.up_proj.weight' is missing"])
    ffn = _copy(llama, tmp_path / "ffn", intermediate_size=96)
    cases["shape"] = (h2m + ["--src", ffn, "--tp", "1"], ["has shape [", "implies [96", "intermediate_size"])
    # 8. Corrupt config.json and corrupt Megatron metadata.
    badjson = _copy(llama, tmp_path / "badjson")
    open(os.path.join(badjson, "config.json"), "w").write("{not json")
    cases["config json"] = (h2m + ["--src", badjson, "--tp", "1"], ["badjson/config.json", "not valid JSON"])
    corrupt = _fake_megatron(llama, tmp_path / "corrupt")
    open(os.path.join(corrupt, mio.META), "w").write('{"tp": 2')
    cases["corrupt meta"] = (["megatron-to-hf", "--src", corrupt, "--out", out], ["corrupt/megatron_rl.json", "corrupt metadata"])
    # 9. A half-written Megatron checkpoint (dist-checkpointing's metadata.json never written).
    half = _fake_megatron(llama, tmp_path / "half")
    os.remove(os.path.join(half, "metadata.json"))
    cases["half-written"] = (["megatron-to-hf", "--src", half, "--out", out], ["half/metadata.json", "incomplete"])
    # 10. Output directory exists.
    os.makedirs(tmp_path / "exists")
    cases["out exists"] = (["hf-to-megatron", "--src", llama, "--tp", "1", "--out", str(tmp_path / "exists")],
                           ["--out", "exists", "already exists", "--overwrite"])
    # 11. Reshard to a TP the model does not allow.
    good = _fake_megatron(qwen2, tmp_path / "good")
    cases["reshard tp"] = (["reshard", "--src", good, "--out", out, "--tp", "4"], ["--tp 4", "num_query_groups=2"])
    # 12. Tokenizer larger than the model's vocab.
    small = make_tiny_model(str(tmp_path / "small"), family="llama", vocab_size=64)
    cases["tokenizer vocab"] = (h2m + ["--src", small, "--tp", "1"], ["small/tokenizer.json", "vocab mismatch", "64"])
    # 13. A vocab padding that would change with TP.
    cases["vocab divisible"] = (h2m + ["--src", llama, "--tp", "4", "--vocab-divisible-by", "6"],
                                ["--vocab-divisible-by 6", "multiple of --tp 4"])
    # 14. A plain dist checkpoint (no megatron_rl.json) that never finished writing, named by --hf-config.
    os.makedirs(tmp_path / "plain")
    cases["plain half"] = (["megatron-to-hf", "--src", str(tmp_path / "plain"), "--out", out, "--hf-config", llama],
                           ["plain/metadata.json", "not a complete megatron-core dist checkpoint"])
    # 15. A move bucket smaller than one row of a tensor (export and reshard are plans in buckets).
    cases["bucket"] = (["megatron-to-hf", "--src", good, "--out", out, "--bucket-bytes", "100"],
                       ["--bucket-bytes 100", "smaller than one row", "fix: pass --bucket-bytes"])
    for name, (argv, needles) in cases.items():
        line = _run_bad(argv, capsys, monkeypatch)
        for needle in needles:
            assert needle in line, f"{name}: {needle!r} not in {line!r}"
        assert not os.path.exists(out), name
    # 16. World size != TP*PP under torchrun.
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = _run_bad(h2m + ["--src", llama, "--tp", "2", "--pp", "2"], capsys, monkeypatch)
    assert "WORLD_SIZE=3 != TP*PP = 2*2 = 4" in line and "--nproc-per-node 4" in line


def test_help_lists_modes(capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and all(m in text for m in ("hf-to-megatron", "megatron-to-hf", "reshard"))


def test_stream_writer_is_loadable_sharded_and_exact(models, tmp_path):
    """Our streaming writer: sharded output with an index, bitwise tensors, transformers loads it."""
    from transformers import AutoModelForCausalLM

    ckpt = hfio.open_hf(models["qwen2"])
    out = str(tmp_path / "qwen2-copy")
    with publish.atomic_dir(out) as tmp:
        with hfio.SafetensorsStreamWriter(tmp, shapes=ckpt.shape.canonical_shapes(), dtype=ckpt.dtype,
                                          max_shard_bytes=300_000) as w:
            for name in w.names:
                w.write(name, ckpt.tensor(name))
        hfio.copy_hf_extras(ckpt.path, tmp)
    assert len(w.shard_files) > 1 and os.path.isfile(os.path.join(out, hfio.INDEX))
    copy = hfio.open_hf(out)
    for name in ckpt.shape.canonical_shapes():
        assert torch.equal(copy.tensor(name), ckpt.tensor(name)), name
    # slice reads equal narrowing the whole tensor, along both dims
    full = ckpt.tensor("model.layers.1.self_attn.o_proj.weight")
    assert torch.equal(copy.read("model.layers.1.self_attn.o_proj.weight", 1, 8, 24), full[:, 8:32])
    tokens = torch.tensor([[1, 5, 9, 30, 44, 2]])
    a, b = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (ckpt.path, out))
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


def test_exception_mid_write_leaves_no_output(models, tmp_path):
    ckpt = hfio.open_hf(models["llama"])
    out = str(tmp_path / "never")
    with pytest.raises(RuntimeError, match="injected"):
        with publish.atomic_dir(out) as tmp:
            with hfio.SafetensorsStreamWriter(tmp, shapes=ckpt.shape.canonical_shapes(), dtype=ckpt.dtype) as w:
                for i, name in enumerate(w.names):
                    if i == 10:
                        raise RuntimeError("injected failure after 10 tensors")
                    w.write(name, ckpt.tensor(name))
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary sibling


def test_cli_failed_ranks_leave_no_output(models, tmp_path, monkeypatch, capsys):
    """The launching parent removes the temporary output when the ranks fail mid-conversion."""
    seen = {}

    def failing_torchrun(argv, nproc):
        tmp = argv[argv.index("--_tmp") + 1]
        open(os.path.join(tmp, "__0_0.distcp"), "wb").write(b"half")
        seen["tmp"], seen["nproc"] = tmp, nproc
        return 1
    monkeypatch.setattr(convert, "_torchrun", failing_torchrun)
    out = str(tmp_path / "m")
    rc = convert.main(["hf-to-megatron", "--src", models["llama"], "--out", out, "--tp", "2", "--pp", "2"])
    assert rc == 1 and seen["nproc"] == 4
    assert not os.path.exists(out) and not os.path.exists(seen["tmp"])
    assert "no output written" in capsys.readouterr().err


def _source_holds(held, op) -> bool:
    """The op's source slice is, in the source layout, the canonical run the op writes."""
    if held.dim != op.dim:  # a whole tensor (a norm), cut along another dim
        return len(held.blocks) == 1 and held.blocks[0].canon == op.canon and op.src_offset == op.canon_start
    return any(b.canon == op.canon and b.local_start <= op.src_offset
               and op.src_offset + op.length <= b.local_start + b.length
               and b.canon_start + op.src_offset - b.local_start == op.canon_start for b in held.blocks)


def _writes_per_element(plan, shapes, *, drop_last: bool = False) -> dict:
    """How often the plan's ops write each canonical element on rank 0 (counted per element)."""
    counts = {n: torch.zeros(s, dtype=torch.int32) for n, s in shapes.items()}
    ops = [op for bucket in plan.buckets for op in bucket][:-1 if drop_last else None]
    for op in ops:
        assert op.dst_rank == 0 and op.dst_name == op.canon
        counts[op.dst_name].narrow(op.dim, op.dst_offset, op.length).add_(1)
    return counts


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", False), ("llama", True)])
def test_export_plan_writes_every_canonical_element_once(family, tied):
    """The export's plan (Megatron -> HF, every tensor whole on rank 0) writes every canonical
    element exactly once, from a rank that holds it, across TP, PP (tied embedding on two
    stages) and DP copies; a plan missing one op fails the same count (negative control)."""
    from megatron_rl.models.tiny import tiny_hf_config
    from megatron_rl.resharding.layout import hf_layout
    from megatron_rl.resharding.planner import make_plan

    shape = ModelShape.from_hf_config(tiny_hf_config(family, tied=tied))
    shapes = shape.canonical_shapes()
    for tp, pp, world in [(1, 1, 1), (2, 2, 4), (2, 1, 4), (1, 4, 8), (2, 2, 8)]:
        if shape.kv_heads % tp:
            continue
        lay = megatron_layout(shape, RankGrid(world_size=world, tp=tp, pp=pp))
        plan = make_plan(lay, dst=hf_layout(shape, rank=0), bucket_bytes=1 << 16, elem_size=4)
        for op in (op for bucket in plan.buckets for op in bucket):
            assert _source_holds(lay.ranks[op.src_rank][op.src_name], op), (op, tp, pp)
        counts = _writes_per_element(plan, shapes)
        assert set(counts) == set(shapes)
        for name, c in counts.items():
            assert bool((c == 1).all()), (name, tp, pp, int(c.min()), int(c.max()))
        short = _writes_per_element(plan, shapes, drop_last=True)
        assert not all(bool((c == 1).all()) for c in short.values())


def test_broken_checkpoint_module_is_an_error_not_no_checkpoint(tmp_path, monkeypatch):
    """A checkpoint module that fails to import must stop the run, naming the field and the fix;
    before the fix resume_state answered "no checkpoint" (a silent restart at step 0) and
    save_state wrote nothing."""
    import sys

    from megatron_rl import trainer
    from megatron_rl.config import load_config

    cfg = load_config(overrides=[f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.resume=true"])
    monkeypatch.setitem(sys.modules, "megatron_rl.checkpoint.rl", None)  # importing it raises ImportError
    with pytest.raises(ImportError, match=r"checkpoint.resume=true .*cannot be imported.*; fix: "):
        trainer.resume_state(cfg, None, data=None)
    with pytest.raises(ImportError, match=r"checkpoint.dir=.* is set but .*cannot be imported.*; fix: "):
        trainer.save_state(cfg, None, step=0, data=None, rewards=[])
    monkeypatch.delitem(sys.modules, "megatron_rl.checkpoint.rl")
    from megatron_rl.checkpoint.rl import load_rl_checkpoint  # noqa: F401  (unpatched, it imports: the error was ours)
