"""Patches of megatron-core (tested: see ``TESTED``): the only place that patches it.

CPU compatibility layer, the sequence-parallel norm patch and (in ``megatron_distopt``) the
distributed-optimizer fixes; :func:`check_version` refuses an untested megatron-core.

megatron-core assumes CUDA in a handful of places (measured in ENV.md, "CUDA assumptions
that need a CPU shim"). :func:`apply` patches exactly those, only when CUDA is absent, and
is idempotent. Nothing outside megatron-core is touched: no global ``torch.cuda`` patch, so
vLLM and user code in the same process see the real (CUDA-less) torch.

The patches (each one is checked by tests/test_megatron_compat.py, which fails if upstream moves):

1. *triton at import time* (``transformer/moe/ops/paged_stash.py``, 0.19 only): not present
   in 0.16.1 and triton is installed beside vLLM anyway; nothing to patch.
2. *RNG tracker* -- ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
   and ``torch.cuda.manual_seed`` / ``get_rng_state`` inside ``random.py`` (used by
   ``model_parallel_cuda_manual_seed``, ``CudaRNGStatesTracker.add/fork`` and activation
   recompute): backed by the CPU default generator.
3. *``torch.cuda.current_device()``* resolves to ``cpu`` inside megatron modules.
4. *``torch.cuda.synchronize``* (pipeline p2p) is a no-op.
5. *hard-coded ``device="cuda"`` / ``pin_memory=True``* (schedules' token counters,
   ``transformer.utils.get_default_causal_mask``, rope's CP index): every ``torch.<factory>``
   call made from a megatron module gets ``cpu`` and no pinning. Done by giving those modules a
   ``torch`` namespace of their own (:class:`_TorchOnCpu`), which also catches calls made
   from recompute inside backward (a ``TorchFunctionMode`` does not). ``Tensor.cuda()`` calls
   (rope CP index, tied-embedding sync) are removed from the two functions' source.
6. *DDP streams and events* (``torch.cuda.Stream/current_stream/default_stream/Event/stream``):
   null objects, since CPU collectives are synchronous.
7. *``WrappedTorchNorm`` refuses sequence parallel*: replaced by a factory that allows it and
   tags the norm's parameters ``sequence_parallel = True`` so their grads get all-reduced over
   TP (without the tag the grad norm is wrong).
8. *``param.type() == 'torch.cuda.FloatTensor'``* in the distributed optimizer, the
   float16 optimizer and grad clipping: the type strings are rewritten to the CPU ones.
9. *torch-Adam fallback of ``DistributedOptimizer``* (no TE/apex): ``state_dict()`` fails on
   a fresh optimizer and ``load_state_dict()`` shares one ``step`` tensor between all params;
   see ``megatron_distopt.patch_load``. ``get_parameter_state_dp_zero`` calls ``Tensor.cuda()``
   (removed from its source, patch 5).
10. *MoE on CPU*: the all-to-all token dispatcher makes a ``torch.cuda.Stream()`` in
    ``__init__``, the router moves its weight to ``torch.cuda.current_device()``: the MoE
    modules get the CPU ``torch`` namespace (patches 3, 5, 6).
11. *``te_general_gemm`` undefined without Transformer Engine* (``moe_utils``): the router's
    gating GEMM tests ``te_general_gemm is not None``, but the name exists only when TE imports
    (NameError otherwise). Set to None, so the router takes its own ``torch.mm`` path. Applied on
    every device (:func:`apply_for`), as a GPU without TE hits the same NameError; where TE
    defined the name it is left alone.
13. *uneven gathers over gloo* (MoE at TP > 1: the token dispatcher gathers and reduce-scatters
    different token counts per TP rank with list collectives, which gloo refuses): padded to
    equal sizes; see ``megatron_uneven``.

Usage::

    from megatron_rl.compat import megatron_compat
    megatron_compat.apply()          # no-op when CUDA is available
    megatron_compat.apply_for(cuda=torch.cuda.is_available())   # what init_distributed calls: patch 7 on GPU too
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import textwrap
import types

import torch

from megatron_rl.compat import require_tested
from megatron_rl.compat.megatron_distopt import _MARK, patch_load
from megatron_rl.compat import megatron_uneven


TESTED = ("0.16.1",)

# Megatron modules whose ``torch`` name is replaced by a CPU-resolving namespace (patches 3-6).
PROXIED_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.mlp",
    # MoE (patch 10): the all-to-all dispatcher's device-to-host stream and events, the router's
    # and permutation's device="cuda" factories.
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    # dist-checkpointing save/load (torch_dist): synchronize, device='cuda' status tensors.
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.exchange_utils",
)

# (module, qualified function name, [(old source text, new source text), ...]) (patches 5, 8).
SOURCE_REWRITES = (
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank",
     [(".cuda(non_blocking=True)", "")]),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer", [("weight.data.cuda()", "weight.data")]),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
     [("'torch.cuda.FloatTensor'", "'torch.FloatTensor'")]),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups",
     [("'torch.cuda.FloatTensor'", "'torch.FloatTensor'"), ("'torch.cuda.HalfTensor'", "'torch.HalfTensor'"),
      ("'torch.cuda.BFloat16Tensor'", "'torch.BFloat16Tensor'")]),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__",
     [("'torch.cuda.HalfTensor'", "'torch.HalfTensor'"), ("'torch.cuda.BFloat16Tensor'", "'torch.BFloat16Tensor'")]),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero",
     [("send_tensor = send_tensor.cuda()", "send_tensor = send_tensor")]),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__",
     [("'torch.cuda.FloatTensor'", "'torch.FloatTensor'"), ("'torch.cuda.HalfTensor'", "'torch.HalfTensor'"),
      ("'torch.cuda.BFloat16Tensor'", "'torch.BFloat16Tensor'")]),
)



class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work and gloo collectives are synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    """Stands in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _CudaOnCpu:
    """``torch.cuda`` as megatron modules see it on a CUDA-less machine (patches 2-4, 6)."""

    Stream = _NullStream
    Event = _NullEvent

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def current_stream(device=None):
        return _NullStream()

    @staticmethod
    def default_stream(device=None):
        return _NullStream()

    @staticmethod
    def stream(s):
        return contextlib.nullcontext()

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def memory_allocated(device=None):
        return 0

    @staticmethod
    def max_memory_allocated(device=None):
        return 0

    @staticmethod
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    random = types.SimpleNamespace(get_rng_state=lambda device="cuda": torch.get_rng_state(),
                                   set_rng_state=lambda new_state, device="cuda": torch.set_rng_state(new_state))
    nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
                                 range=lambda *a, **k: contextlib.nullcontext())


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or \
            (isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    return device


def _on_cpu(fn):
    """Wrap a torch function so that ``device='cuda'`` becomes cpu and ``pin_memory`` is off."""

    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    wrapped.__name__ = getattr(fn, "__name__", "wrapped")
    return wrapped


class _TorchOnCpu(types.ModuleType):
    """The ``torch`` module as megatron modules see it (patches 3-6): ``cuda`` is
    :class:`_CudaOnCpu`, and plain functions move ``device='cuda'`` tensors to the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.__dict__["cuda"] = _CudaOnCpu()
        self.__dict__["_cache"] = {}

    def __getattr__(self, name):
        cache = self.__dict__["_cache"]
        if name in cache:
            return cache[name]
        attr = getattr(torch, name)
        if isinstance(attr, (types.BuiltinFunctionType, types.FunctionType)):
            attr = _on_cpu(attr)
        cache[name] = attr
        return attr


_TORCH_ON_CPU = _TorchOnCpu()


# --- patch 2: RNG ----------------------------------------------------------------------------


def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    """CPU replacement of ``tensor_parallel.random._get_cuda_rng_state``."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    """CPU replacement of ``tensor_parallel.random._set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


def _patch_rng():
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _get_cpu_rng_state
    random._set_cuda_rng_state = _set_cpu_rng_state


# --- patch 7: torch norms under sequence parallel -------------------------------------------


def _norm_factory(original):
    class WrappedTorchNormSP:
        """``WrappedTorchNorm`` that allows sequence parallel and tags its parameters."""

        def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
            sp = config.sequence_parallel
            config.sequence_parallel = False
            try:
                norm = original(config, hidden_size, eps, **kwargs)
            finally:
                config.sequence_parallel = sp
            for p in norm.parameters():
                setattr(p, "sequence_parallel", sp)
            return norm

    WrappedTorchNormSP.__wrapped__ = original
    return WrappedTorchNormSP


def _patch_norm():
    torch_norm = importlib.import_module("megatron.core.transformer.torch_norm")
    original = torch_norm.WrappedTorchNorm
    for modname in ("megatron.core.models.backends", "megatron.core.models.gpt.gpt_layer_specs",
                    "megatron.core.transformer.transformer_block"):
        importlib.import_module(modname)
    # Every module that bound the class (WrappedTorchNorm, LNImpl, LayerNormImpl) gets the patched one.
    _rebind(original, _norm_factory(original))


# --- source rewrites (patches 5, 8) ----------------------------------------------------------


def rewrite_function(module, qualname: str, replacements) -> None:
    """Recompile ``module.qualname`` from its source with each ``(old, new)`` text replaced.

    Raises ``RuntimeError`` if a text to replace is not in the source (upstream moved).
    """
    owner_name, _, fn_name = qualname.rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    raw = inspect.getattr_static(owner, fn_name)
    fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
    src = textwrap.dedent(inspect.getsource(fn))
    for old, new in replacements:
        if old not in src:
            raise RuntimeError(f"megatron_compat: {module.__name__}.{qualname} no longer contains {old!r}; "
                               "fix: update megatron_rl/compat/megatron_compat.py for this megatron-core version")
        src = src.replace(old, new)
    lines = src.splitlines()
    while lines[0].lstrip().startswith("@"):  # decorators are re-applied below
        lines.pop(0)
    # A closure over ``__class__`` keeps zero-argument super() working in methods.
    wrapper = "def _make(__class__):\n" + textwrap.indent("\n".join(lines), "    ") + f"\n    return {fn_name}\n"
    code = compile(wrapper, inspect.getsourcefile(fn), "exec")
    scope: dict = {}
    exec(code, fn.__globals__, scope)
    new_fn = scope["_make"](owner if owner_name else None)
    new_fn.__qualname__ = fn.__qualname__
    new_fn.__doc__ = fn.__doc__
    new_fn.__wrapped__ = fn
    if isinstance(raw, classmethod):
        new_fn = classmethod(new_fn)
    elif isinstance(raw, staticmethod):
        new_fn = staticmethod(new_fn)
    setattr(owner, fn_name, new_fn)
    if not owner_name:
        _rebind(fn, new_fn)


def _rebind(old, new) -> None:
    """Point every loaded megatron module that imported ``old`` by name at ``new``."""

    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and mod is not None:
            for attr, value in list(vars(mod).items()):
                if value is old:
                    setattr(mod, attr, new)


# --- entry point -----------------------------------------------------------------------------


def apply_te_general_gemm() -> bool:
    """Patch 11 alone (every device): ``te_general_gemm = None`` where TE did not define it.
    Returns True if applied now."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def _patch_moe() -> None:
    """Patches 11 and 12 (CPU): patch 11, and numpy split sizes."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    importlib.import_module("megatron.core.transformer.moe.token_dispatcher")  # loaded, so _rebind reaches it
    apply_te_general_gemm()
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        out = original(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(out) and out.device.type == "cpu":
            out = out.numpy()
        return out

    maybe_move_tensor_to_cpu.__wrapped__ = original
    _rebind(original, maybe_move_tensor_to_cpu)


def check_version() -> str:
    """Refuse an untested megatron-core (one line); returns the installed version."""
    from megatron.core import package_info  # lazy: keeps vLLM/megatron out of CLI start-up

    return require_tested("megatron-core", package_info.__version__, TESTED)


def needed() -> bool:
    return not torch.cuda.is_available()


def apply_for(*, cuda: bool) -> list[str]:
    """The patches a process needs: on every device, patches 7 (megatron's local spec, which GPU
    runs without Transformer Engine use too, refuses sequence parallel) and 11 (the MoE router
    without TE); without CUDA, all of them. Returns the names applied now (idempotent)."""
    check_version()
    applied = ["sequence_parallel_norm"] if apply_sequence_parallel_norm() else []
    if apply_te_general_gemm():
        applied.append("te_general_gemm")
    if not cuda and apply():
        applied.append("cpu")
    return applied


def apply_sequence_parallel_norm() -> bool:
    """Patch 7 alone: needed on GPU too. Returns True if applied now."""
    marker = importlib.import_module("megatron.core")
    if getattr(marker, _MARK + "_norm", False):
        return False
    _patch_norm()
    setattr(marker, _MARK + "_norm", True)
    return True


def apply(*, force: bool = False) -> bool:
    """Apply every patch once, when CUDA is absent (or ``force``). Returns True if applied now."""
    if not (force or needed()):
        return False
    check_version()
    marker = importlib.import_module("megatron.core")
    if getattr(marker, _MARK, False):
        return False
    for name in PROXIED_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = _TORCH_ON_CPU
    _patch_rng()
    apply_sequence_parallel_norm()
    for modname, qualname, repl in SOURCE_REWRITES:
        rewrite_function(importlib.import_module(modname), qualname, repl)
    patch_load()
    _patch_moe()
    megatron_uneven.apply()
    setattr(marker, _MARK, True)
    return True
