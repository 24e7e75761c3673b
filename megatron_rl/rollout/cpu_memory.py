"""CPU memory primitives for the vLLM worker: process RSS, returning freed heap to the OS,
and releasing the KV cache's pages (vLLM's sleep mode is a no-op on CPU).

Where the KV cache lives on a CPU worker is vLLM-private: ``compat.vllm_compat.kv_cache_tensors``.

Releasing the KV cache keeps its tensors and their virtual addresses and gives the physical
pages back with ``madvise(MADV_DONTNEED)``: the CPU counterpart of vLLM's CUDA sleep mode,
which unmaps the physical memory behind a cache whose virtual range it keeps. RSS drops at
once; a page comes back, zero-filled, when the next rollout first writes it. Nothing has
to be rebuilt on resume (only the prefix cache is reset: it would point at zeroed blocks),
so a release/resume cycle costs microseconds instead of re-running vLLM's KV set-up.
Only whole pages inside a storage are advised, so no neighbouring allocation is touched.

glibc keeps freed 4-64 MiB blocks on the heap once its mmap threshold has grown, so a weight
release ends with ``malloc_trim(0)``; under tcmalloc ``MallocExtension_ReleaseFreeMemory``.

Usage::

    nbytes = release_kv_pages(worker)   # RSS falls by ~nbytes; the tensors stay valid
    # resume: nothing to rebuild; reset the prefix cache
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from megatron_rl.compat import vllm_compat

_PAGE = os.sysconf("SC_PAGE_SIZE")
_MADV_DONTNEED = 4  # linux/mman.h
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (no psutil sampling delay)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def return_memory_to_os() -> dict:
    """Ask the allocator to give free heap pages back; reports what ran.

    No ``gc.collect()``: released tensors have no reference cycles and go by refcount, and a
    full collection in a process holding megatron-core and vLLM costs tens of milliseconds.
    """
    done = {}
    if hasattr(_LIBC, "malloc_trim"):
        done["malloc_trim"] = int(_LIBC.malloc_trim(0))
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        try:
            tc = ctypes.CDLL(None)
            tc.MallocExtension_ReleaseFreeMemory()
            done["tcmalloc_release"] = 1
        except (AttributeError, OSError):
            done["tcmalloc_release"] = 0
    return done


def discard_pages(storage: torch.UntypedStorage) -> int:
    """Give the whole pages inside ``storage`` back to the OS; their contents read as zero
    afterwards. Returns the bytes advised. Only for private anonymous memory (torch's CPU
    allocator), never for file-backed or shared storages."""
    return discard_range(storage.data_ptr(), storage.nbytes())


def discard_range(start: int, nbytes: int) -> int:
    """``discard_pages`` for the address range ``[start, start + nbytes)``: only the pages
    wholly inside it are given back, so bytes outside it never change."""
    end = start + nbytes
    lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if hi <= lo:
        return 0
    if _LIBC.madvise(lo, hi - lo, _MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_DONTNEED) on {hi - lo} bytes failed: {os.strerror(err)}")
    return hi - lo


def kv_cache_bytes(worker) -> int:
    """Bytes of the distinct KV storages of this worker (resident or not)."""
    return sum(st.nbytes() for st in _kv_storages(worker))


def _kv_storages(worker) -> list[torch.UntypedStorage]:
    seen, out = set(), []
    for t in vllm_compat.kv_cache_tensors(worker):
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                out.append(st)
    return out


def release_kv_pages(worker) -> int:
    """Give back the physical pages of every KV storage of this worker; returns the bytes."""
    return sum(discard_pages(st) for st in _kv_storages(worker))
