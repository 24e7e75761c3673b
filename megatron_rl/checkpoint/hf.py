"""HF checkpoints: the one reader (validated slice reads) and the safetensors writer.

Reading never loads a whole tensor it does not need: :meth:`HFCheckpoint.read` takes one run of
one canonical tensor through safetensors' ``get_slice``, which is exactly the ``ReadFn`` that
:func:`megatron_rl.resharding.layout.assemble` wants. :func:`open_hf` validates the directory
first (files, headers, architecture, every tensor's shape and dtype, vocab) and fails with one
line naming the file and the fix. Conversion and training's initial load
(:func:`megatron_rl.checkpoint.megatron.load_hf_into`) both read through it.

Writing: :class:`SafetensorsStreamWriter` lays out every shard's header from the known shapes
and takes one tensor at a time, in any order (a plan delivers tensors as their last bucket
lands), each at its own offset; the output's bytes do not depend on the order. Outputs are
written under a hidden temporary sibling and renamed (:mod:`.publish`).

Usage::

    ckpt = open_hf("runs/tiny-llama")              # raises CheckpointError on bad input
    run = ckpt.read("model.layers.0.mlp.up_proj.weight", 0, 32, 32)   # rows 32..63
    with atomic_dir("runs/out") as tmp:
        with SafetensorsStreamWriter(tmp, shapes=ckpt.shape.canonical_shapes(), dtype=ckpt.dtype) as w:
            for name in w.names:
                w.write(name, ckpt.tensor(name))
        copy_hf_extras(ckpt.path, tmp)
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import struct

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from megatron_rl.checkpoint import CheckpointError
from megatron_rl.checkpoint.publish import close_synced, write_json
from megatron_rl.parallel.grid import LayoutError
from megatron_rl.resharding.layout import SUPPORTED_ARCHS, ModelShape


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tensors some HF checkpoints carry that are not weights of the model.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


def _fail(where: str, problem: str, fix: str):
    raise CheckpointError(f"{where}: {problem}; fix: {fix}")


# ---------------------------------------------------------------------------------------------
# Reading.


class HFCheckpoint:
    """A validated HF checkpoint directory; tensors are read lazily, by slices."""

    def __init__(self, path: str, config, shape: ModelShape, files: dict[str, str], dtype: torch.dtype):
        self.path = path
        self.config = config
        self.shape = shape
        self.files = files  # tensor name -> absolute safetensors path
        self.dtype = dtype
        self._handles: dict[str, object] = {}

    def _handle(self, name: str):
        f = self.files[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        return self._handles[f]

    def read(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """``canon[name].narrow(dim, start, length)``, reading only those bytes' neighbourhood."""
        sl = self._handle(name).get_slice(name)
        index = (slice(None),) * dim + (slice(start, start + length),)
        return sl[index]

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)


def _load_config(path: str):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        _fail(cfg_path, "missing", "pass the HF model directory that holds config.json (save_pretrained output)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(cfg_path, f"is not valid JSON ({e})", "restore config.json from the original model")
    archs = raw.get("architectures") or []

    if not archs or archs[0] not in SUPPORTED_ARCHS:
        _fail(f"{cfg_path}: architectures", f"architecture {archs[0] if archs else None!r} is not supported",
              f"convert a model of one of {sorted(SUPPORTED_ARCHS)}")

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; report its one line
        _fail(cfg_path, f"transformers cannot parse it ({str(e).splitlines()[0]})",
              "restore config.json from the original model")
    return cfg


def _weight_files(path: str) -> dict[str, str]:
    """Tensor name -> file, from the index when sharded, else from the single file's header."""

    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            _fail(index, f"is not a valid safetensors index ({e!r})", "restore it, or re-save the model")
        files = {n: os.path.join(path, f) for n, f in weight_map.items()}
    elif os.path.isfile(os.path.join(path, SINGLE)):
        files = None
    else:
        found = sorted(os.listdir(path))
        hint = "re-save it with save_pretrained(..., safe_serialization=True)" if any(
            f.endswith(".bin") for f in found) else "pass a directory saved with save_pretrained"
        _fail(os.path.join(path, SINGLE), "missing (no model.safetensors and no " + INDEX + ")", hint)
    names_by_file: dict[str, list[str]] = {}
    for f in sorted(set(files.values())) if files else [os.path.join(path, SINGLE)]:
        if not os.path.isfile(f):
            _fail(f, f"missing (listed in {INDEX})", "copy every shard the index lists, or re-save the model")
        try:
            with safe_open(f, framework="pt") as h:
                names_by_file[f] = list(h.keys())
        except (SafetensorError, OSError, ValueError) as e:
            _fail(f, f"is truncated or corrupt ({str(e).splitlines()[0]})",
                  "re-copy or re-save this file; it is not a complete safetensors file")
    if files is None:
        files = {n: f for f, ns in names_by_file.items() for n in ns}
    for f, ns in names_by_file.items():
        missing = [n for n in ns if files.get(n) != f]
        if missing:
            _fail(index, f"does not list tensor {missing[0]!r} of {os.path.basename(f)}", "re-save the model")
    return files


def _check_tensors(path: str, shape: ModelShape, files: dict[str, str]) -> torch.dtype:
    """Every canonical tensor present with its shape and one dtype; nothing unknown."""

    expected = shape.canonical_shapes()
    actual: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(set(files.values())):
        with safe_open(f, framework="pt") as h:
            for n in h.keys():
                sl = h.get_slice(n)
                actual[n] = (tuple(sl.get_shape()), sl.get_dtype())
    emb = actual.get("model.embed_tokens.weight")
    if emb and emb[0][0] != shape.vocab:
        _fail(os.path.join(path, "config.json") + ": vocab_size",
              f"vocab mismatch: config says {shape.vocab} but model.embed_tokens.weight has {emb[0][0]} rows",
              "make config.json's vocab_size equal the embedding rows (resize_token_embeddings, then re-save)")
    for n, s in expected.items():
        if n not in actual:
            _fail(path, f"tensor {n!r} is missing from the safetensors files",
                  "check config.json matches the weights (layers, tie_word_embeddings, attention_bias)")
        if actual[n][0] != s:
            _fail(files[n], f"tensor {n!r} has shape {list(actual[n][0])}, config.json implies {list(s)}",
                  "check config.json (hidden_size, heads, kv heads, head_dim, intermediate_size) matches the weights")
    for n in actual:
        if n not in expected and not n.endswith(IGNORED_SUFFIXES) and not (shape.tied and n == "lm_head.weight"):
            _fail(files[n], f"unexpected tensor {n!r} for {shape.arch} with this config",
                  "check config.json (tie_word_embeddings, attention_bias, architecture) matches the weights")
    dtypes = {actual[n][1] for n in expected}
    if len(dtypes) != 1:
        _fail(path, f"tensors have mixed dtypes {sorted(dtypes)}", "re-save the model in one dtype")
    st = dtypes.pop()
    by_st = {v: k for k, v in _ST_DTYPES.items()}
    if st not in by_st:
        _fail(path, f"tensor dtype {st} is not supported", f"re-save the model in one of {sorted(by_st)}")
    return by_st[st]


def open_hf(path: str, *, tokenizer_check: bool = True) -> HFCheckpoint:
    """Validate an HF checkpoint directory and return a lazy reader of it."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        _fail(path, "HF checkpoint directory does not exist",
              "pass the directory that holds config.json and model*.safetensors")
    cfg = _load_config(path)
    try:
        shape = ModelShape.from_hf_config(cfg)
    except LayoutError as e:
        _fail(os.path.join(path, "config.json"), str(e).split("; fix:")[0], "convert a supported architecture")
    files = _weight_files(path)
    dtype = _check_tensors(path, shape, files)
    if tokenizer_check:
        _check_tokenizer(path, shape.vocab)
    return HFCheckpoint(path, cfg, shape, files, dtype)


def _check_tokenizer(path: str, vocab: int) -> None:
    """A tokenizer whose ids exceed the model's vocab is a vocab mismatch (no work done yet)."""
    tok = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok):
        return
    try:
        with open(tok) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(tok, f"is not valid JSON ({e})", "restore the tokenizer files from the original model")
    ids = list((data.get("model") or {}).get("vocab", {}).values() if isinstance(
        (data.get("model") or {}).get("vocab"), dict) else [])
    ids += [t.get("id", 0) for t in data.get("added_tokens", [])]
    if ids and max(ids) >= vocab:
        _fail(tok, f"vocab mismatch: tokenizer has token id {max(ids)} but config.json vocab_size is {vocab}",
              "resize the model's embeddings to the tokenizer (resize_token_embeddings) and re-save")


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name.replace("torch.", "")]


# ---------------------------------------------------------------------------------------------
# Writing.


class SafetensorsStreamWriter:
    """Write known tensors, one at a time and in any order, into HF safetensors shards.

    ``shapes`` fixes names, order and shapes up front: the shard a tensor goes to and its byte
    offset there follow from ``names`` (the canonical order), so every shard's header is
    written when the shard is first touched and each tensor lands at its own offset. The bytes
    of the output do not depend on the order of the :meth:`write` calls (a plan delivers
    tensors in its bucket order); each name must be written exactly once.
    """

    def __init__(self, out_dir: str, *, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 max_shard_bytes: int = 5 * 2**30):
        self.out_dir, self.dtype, self.names = out_dir, dtype, list(shapes)
        self.shapes = dict(shapes)
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        shards: list[list[str]] = [[]]
        size = 0
        for n in self.names:
            nbytes = self._nbytes(n)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(n)
            size += nbytes
        k = len(shards)
        self.shard_files = [SINGLE if k == 1 else f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self.file_of = {n: fname for fname, names in zip(self.shard_files, shards) for n in names}
        self._shards = dict(zip(self.shard_files, shards))
        self._offset: dict[str, int] = {}  # name -> absolute byte offset in its shard file
        self._fh: dict[str, object] = {}  # shard file -> open handle
        self._written: set[str] = set()
        self._total = sum(self._nbytes(n) for n in self.names)

    def _nbytes(self, name: str) -> int:
        return self._itemsize * _numel(self.shapes[name])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        for fh in self._fh.values():
            fh.close()
        self._fh.clear()

    def _open_shard(self, fname: str):
        header, off = {}, 0
        for n in self._shards[fname]:
            nbytes = self._nbytes(n)
            header[n] = {"dtype": _ST_DTYPES[self.dtype], "shape": list(self.shapes[n]), "data_offsets": [off, off + nbytes]}
            off += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
        base = 8 + len(raw)
        for n in self._shards[fname]:
            self._offset[n] = base + header[n]["data_offsets"][0]
        fh = self._fh[fname] = open(os.path.join(self.out_dir, fname), "wb")
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(base + off)  # the whole shard's length; every byte is written before close
        return fh

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.shapes or name in self._written:
            why = "written twice" if name in self._written else "not in this checkpoint"
            raise RuntimeError(f"SafetensorsStreamWriter: tensor {name!r} is {why}")
        if tuple(tensor.shape) != tuple(self.shapes[name]):
            raise RuntimeError(f"{name}: shape {tuple(tensor.shape)} != {self.shapes[name]}")
        fname = self.file_of[name]
        fh = self._fh.get(fname) or self._open_shard(fname)
        t = tensor.detach().to(dtype=self.dtype, device="cpu").contiguous()
        fh.seek(self._offset[name])
        fh.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self._written.add(name)

    def close(self) -> None:
        if len(self._written) != len(self.names):
            missing = [n for n in self.names if n not in self._written]
            raise RuntimeError(f"SafetensorsStreamWriter closed after {len(self._written)} of {len(self.names)} "
                               f"tensors (missing {missing[:2]})")
        for fname in self.shard_files:  # every name written: every shard is open
            close_synced(self._fh.pop(fname))
        if len(self.shard_files) > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": self.file_of}
            write_json(os.path.join(self.out_dir, INDEX), index)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", INDEX, "pytorch_model.bin.index.json")


def copy_hf_extras(src_dir: str, dst_dir: str) -> list[str]:
    """Copy config, generation config and tokenizer files (every small non-weight file)."""
    weights = {os.path.basename(p) for pat in WEIGHT_PATTERNS for p in glob.glob(os.path.join(src_dir, pat))}
    copied = []
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if name.startswith(".") or name in weights or not os.path.isfile(src):
            continue
        shutil.copyfile(src, os.path.join(dst_dir, name))
        copied.append(name)
    return copied


def ensure_generation_config(hf_dir: str) -> bool:
    """Write ``generation_config.json`` from ``config.json`` when the directory has none (HF's
    defaults for that model: its bos/eos/pad ids). Returns True if it wrote one."""
    if os.path.isfile(os.path.join(hf_dir, "generation_config.json")):
        return False
    from transformers import GenerationConfig  # lazy: only an export without one needs it

    GenerationConfig.from_model_config(AutoConfig.from_pretrained(hf_dir)).save_pretrained(hf_dir)
    return True
