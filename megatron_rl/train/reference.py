"""The frozen reference policy of the KL penalty, kept off the device between uses.

With ``algorithm.kl_coef > 0`` the GRPO loss adds ``kl_coef * KL(pi || pi_ref)`` per token, where
``pi_ref`` is the policy *before* RL. :class:`ReferenceModel` is a second megatron-core GPTModel at
the policy's parallel layout, loaded from HF weights (``algorithm.ref_hf_path``, by default
``model.hf_path``) and never from an RL checkpoint, so a resumed run has exactly the reference
of a fresh one. It has no optimizer and no DDP wrapper, runs only forward under ``no_grad``
(no gradients) in eval mode, once per step, on the micro-batches the policy trains on.

Between uses its parameters leave the device, through one seam (:func:`make_store`): the store
writes or copies the weights once at start-up (they never change), then ``offload()`` /
``onload()`` only re-point each ``param.data``.

* **CUDA** (:class:`PinnedHostStore`): a pinned host copy is made once. Offload frees the device
  storage (``param.data`` becomes an empty tensor, so the caching allocator can hand the
  memory to training); onload copies the host copy back with ``non_blocking=True``, which is
  ordered before the forward on the same stream.
* **CPU** (:class:`FileMappedStore`): the host *is* the device, so a host copy frees nothing.
  The rank's parameters are written once to ``<store_dir>/reference-rank<r>.bin``. Onload maps
  that file privately (``torch.from_file(shared=False)``, i.e. ``MAP_PRIVATE``) and points every
  parameter at its slice; offload drops the mapping. While mapped the weights are clean
  file-backed pages (RssFile), which the kernel may drop under pressure and read back on touch;
  offloaded, the process maps none of them (they may stay in the page cache, which is
  reclaimable and not charged to the process's RSS). Onload copies nothing, and the bytes are
  the file's, so log-probs are bitwise identical after any number of offload/onload cycles.
  Rejected: a second host copy (frees nothing on CPU), ``madvise(MADV_DONTNEED)`` on anonymous
  memory (it zero-fills: the weights would be lost), and re-loading from HF each step (re-runs
  the layout conversion). Keep the run directory on a disk, not tmpfs: tmpfs pages are shared
  memory, which the kernel can only swap, so the offload would move bytes, not free them.

Usage::

    ref = ReferenceModel(hf_config, parallel=cfg.parallel, topo=topo, hf_path=path, store_dir=run_dir + "/reference")
    with ref.onloaded():                        # the reference starts offloaded
        metrics = ref.forward(batches, forward_fn=make_forward_fn(pg_loss))
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Callable

import torch

from megatron_rl.models import build_gpt
from megatron_rl.checkpoint.megatron import load_hf_into
from megatron_rl.rollout.cpu_memory import return_memory_to_os
from megatron_rl.train.engine import run_schedule


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_ALIGN = 64  # byte alignment of every parameter inside the file (any dtype can view its slice)


def _unique_params(chunks: list) -> list:
    seen, out = set(), []
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) not in seen:  # a tied embedding/output weight is one Parameter
                seen.add(id(p))
                out.append(p)
    return out


def file_offsets(params: list, *, align: int = _ALIGN) -> tuple[list, int]:
    """``([(byte offset, nbytes)] per parameter, file size)``: back to back, each offset aligned."""
    out, pos = [], 0
    for p in params:
        pos = -(-pos // align) * align
        n = p.numel() * p.element_size()
        out.append((pos, n))
        pos += n
    return out, pos


class FileMappedStore:
    """CPU: the parameters live in a private map of a file written once (see the module docstring)."""

    def __init__(self, params: list, *, path: str):
        self.params, self.path = params, path
        self.spans, self.nbytes = file_offsets(params)
        self.meta = [(p.dtype, tuple(p.shape)) for p in params]
        _write_flat(params, path)
        self.resident = True  # the parameters still hold their original (anonymous) storage
        self._loaded_copy = True

    def onload(self) -> None:
        if self.resident:
            return
        self.resident = True
        if not self.nbytes:
            return
        flat = torch.from_file(self.path, shared=False, size=self.nbytes, dtype=torch.uint8)  # (nbytes,)
        for p, (off, n), (dtype, shape) in zip(self.params, self.spans, self.meta):
            p.data = flat[off:off + n].view(dtype).view(shape)
        flat[::_PAGE].sum()  # fault every page in now, as a device copy would be complete

    def offload(self) -> None:
        for p, (dtype, _) in zip(self.params, self.meta):
            p.data = torch.empty(0, dtype=dtype)  # the last view goes: the file map is unmapped
        if self._loaded_copy:  # the first offload frees the copy the loader filled (heap blocks)

            return_memory_to_os()
            self._loaded_copy = False
        self.resident = False


class PinnedHostStore:
    """CUDA: a pinned host copy; offload frees device storage, onload copies back.

    The host buffers are allocated once. A model whose weights change (the critic) calls
    :meth:`capture` before each offload: the current device bytes are copied into the same
    pinned buffers, so no pinned memory is allocated after the first offload (pinning is slow
    and fragments the host allocator)."""

    def __init__(self, params: list):
        self.params = params
        self.host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params]
        self.device = params[0].device if params else torch.device("cuda")
        self.nbytes = sum(p.numel() * p.element_size() for p in params)
        self.capture(params)

    def fits(self, params: list) -> bool:
        """Whether ``params`` match the host buffers one to one in shape and dtype."""
        return len(params) == len(self.host) and all(
            p.shape == h.shape and p.dtype == h.dtype for p, h in zip(params, self.host))

    def capture(self, params: list) -> None:
        """Copy ``params``' current bytes into the host buffers (blocking); they become resident."""
        if not self.fits(params):
            raise ValueError("PinnedHostStore.capture: the tensors do not match the host buffers; fix: make_store()")
        self.params = params
        for p, h in zip(params, self.host):
            h.copy_(p.detach())
        self.resident = True

    def onload(self) -> None:
        if self.resident:
            return
        for p, h in zip(self.params, self.host):
            p.data = h.to(self.device, non_blocking=True)
        self.resident = True

    def offload(self) -> None:
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.resident = False


def make_store(params: list, *, path: str, reuse=None):
    """The device's offload store for ``params`` (all on one device); ``path`` is used on CPU.

    ``reuse``: the store of a previous offload of the same model. On CUDA it is refilled in place
    when the tensors still match (:meth:`PinnedHostStore.capture`); on CPU a fresh file is written
    and swapped in atomically (the old private map stays valid until its last view goes).
    """
    if params and params[0].device.type == "cuda":
        if isinstance(reuse, PinnedHostStore) and reuse.fits(params):
            reuse.capture(params)
            return reuse
        return PinnedHostStore(params)
    return FileMappedStore(params, path=path)


class InPlaceStore:
    """Offloads flat tensors *in place*: their storage is emptied (``untyped_storage().resize_(0)``)
    and refilled on onload, so that every view of them stays valid. This is how a model under
    the distributed optimizer leaves the device: its parameters are views of the DDP parameter
    buffer, and the optimizer's fp32 shards are views of those (re-pointing ``param.data``, as the
    other stores do, would cut both links). The bytes are taken afresh at every offload.

    * CUDA: pinned host buffers, allocated once and refilled in place;
    * CPU: a file written at each offload (atomically) and copied back on onload, the copy
      being what a device transfer would be (the anonymous pages are freed while offloaded).
    """

    def __init__(self, tensors: list, *, path: str):
        for t in tensors:
            if t.storage_offset() or t.numel() * t.element_size() != t.untyped_storage().nbytes() or \
                    not t.is_contiguous():
                raise ValueError("InPlaceStore: every tensor must be its whole storage, contiguous; fix: pass the "
                                 "buffers themselves (e.g. DDP's param_data), not views of them")
        self.tensors, self.path = tensors, path
        self.cuda = bool(tensors) and tensors[0].is_cuda
        self.nbytes = [t.untyped_storage().nbytes() for t in tensors]
        self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors] if self.cuda else None
        self.resident = True

    def offload(self) -> None:
        if not self.resident or not self.tensors:
            self.resident = False
            return
        if self.cuda:
            for t, h in zip(self.tensors, self.host):
                h.copy_(t)  # blocking: the storage is emptied next
        else:
            _write_flat(self.tensors, self.path)
        for t in self.tensors:
            t.untyped_storage().resize_(0)
        self.resident = False

    def onload(self) -> None:
        if self.resident:
            return
        for t, n in zip(self.tensors, self.nbytes):
            t.untyped_storage().resize_(n)
        if self.cuda:
            for t, h in zip(self.tensors, self.host):
                t.copy_(h, non_blocking=True)  # ordered before the next kernel on the stream
        else:
            spans, total = file_offsets(self.tensors)
            flat = torch.from_file(self.path, shared=False, size=total, dtype=torch.uint8)  # (total,)
            for t, (off, n) in zip(self.tensors, spans):
                t.view(-1).view(torch.uint8).copy_(flat[off:off + n])
            del flat  # the private map goes: only the copies stay
        self.resident = True


def _write_flat(tensors: list, path: str) -> None:
    """The bytes of ``tensors`` at :func:`file_offsets`, to ``path`` (written beside it, then renamed)."""
    spans, total = file_offsets(tensors)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        for t, (off, n) in zip(tensors, spans):
            f.seek(off)
            c = t.detach().contiguous()
            if n:  # the bytes in place: ``.numpy()`` would make the storage non-resizable (InPlaceStore)
                f.write((ctypes.c_char * n).from_address(c.data_ptr()))
        f.truncate(total)
    os.replace(tmp, path)


@contextlib.contextmanager
def _rng_untouched():
    """Building a model draws random init weights: keep the job's RNG streams where they were."""
    from megatron.core import tensor_parallel  # lazy: keeps vLLM/megatron out of CLI start-up

    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield
    tracker.set_states(states)


class Offloadable:
    """A model that lives on the device only between ``onload()`` and ``offload()``."""

    def onload(self) -> None:
        raise NotImplementedError

    def offload(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def onloaded(self):
        """Onload for the block, offload after it (also on error)."""
        self.onload()
        try:
            yield self
        finally:
            self.offload()


class ReferenceModel(Offloadable):
    """A frozen copy of the initial policy at the policy's layout, offloaded between uses.

    Args:
        hf_config: the transformers config (the policy's architecture).
        parallel: the ``ParallelConfig`` (the process groups must exist).
        topo: the :class:`~megatron_rl.parallel.Topology` the policy runs on.
        hf_path: where the initial weights are (never an RL checkpoint).
        store_dir: where the CPU store writes its file (one per rank).
    """

    def __init__(self, hf_config, *, parallel, topo, hf_path: str, store_dir: str, dtype=torch.float32,
                 vocab_divisible_by: int = 128):
        # lazy: keeps vLLM/megatron out of CLI start-up
        from megatron_rl.attention import SharedPrefixCoreAttention, enable_shared_prefix

        with _rng_untouched():
            chunks = build_gpt(hf_config, parallel=parallel, topo=topo, dtype=dtype,
                               vocab_divisible_by=vocab_divisible_by, core_attention=SharedPrefixCoreAttention)
        load_hf_into(chunks, hf_path, topo=topo, hf_config=hf_config, vocab_divisible_by=vocab_divisible_by)
        enable_shared_prefix(chunks)
        for chunk in chunks:
            # Frozen = never in an optimizer, and every forward runs under no_grad (no graph, no
            # .grad). The parameters keep requires_grad=True on purpose: megatron's linear layers
            # take another path for requires_grad=False weights (LinearWithFrozenWeight, whose
            # matmul may run as bmm instead of mm), which moves the last bit at TP > 1 (measured
            # 9.5e-7). With the flag kept, the reference runs the policy's exact kernels, so at
            # step 0 their log-probs are bitwise equal.
            chunk.eval()
            chunk.config.calculate_per_token_loss = True  # the loss returns sums, as in the engine
        self.model = chunks
        params = _unique_params(chunks)
        self.param_bytes = sum(p.numel() * p.element_size() for p in params)
        self.store = make_store(params, path=os.path.join(store_dir, f"reference-rank{topo.rank}.bin"))
        self.offload()

    @property
    def resident(self) -> bool:
        """True while the parameters are on the device (between onload and offload)."""
        return self.store.resident

    def onload(self) -> None:
        self.store.onload()

    def offload(self) -> None:
        self.store.offload()

    @torch.no_grad()
    def forward(self, batches: list, *, forward_fn: Callable) -> list:
        """Forward only, like ``TrainEngine.forward``: per-micro-batch metrics (last PP stage)."""

        if not self.store.resident:
            raise RuntimeError("ReferenceModel.forward while offloaded; fix: run it inside `with ref.onloaded():`")
        return run_schedule(self.model, batches, forward_fn=forward_fn, forward_only=True)


def reference_path(algo, *, model_path: str) -> str:
    """The weights the reference loads: ``algorithm.ref_hf_path`` or, by default, the policy's."""
    return getattr(algo, "ref_hf_path", None) or model_path


__all__ = ["FileMappedStore", "PinnedHostStore", "ReferenceModel", "file_offsets", "make_store", "reference_path"]
