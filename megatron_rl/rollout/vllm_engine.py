"""vLLM as the rollout engine, SPMD: one vLLM worker per torchrun rank (``external_launcher``).

The world is split into ``world / tp`` replicas of TP = ``rollout.tp`` (vLLM's layout:
``rank = replica * tp + tp_rank``). Each replica generates its contiguous share of the
prompts; results are all-gathered so every rank returns all of them, in prompt order.

Release/resume: on CUDA vLLM's sleep mode (level 1 = offload weights, 2 = discard) and
``wake_up(tags)``. On CPU, where sleep is a no-op, we release the memory ourselves: the KV
cache's pages go back to the OS and return on first touch (:mod:`cpu_memory`), the weights
and their packed kernels are dropped and re-created (:mod:`vllm_weights`); offloaded weights
go to a file in the run directory (on CPU the host *is* the device, so only a file takes
them out of RSS). Every lifecycle call is collective: one tiny all-gather over the control
group (which carries the job's timeout) checks, before any work, that every rank makes the
same call with the same tags from the same state (else all raise). The work itself is local:
a rank whose release or resume fails raises at once (the job's fail-fast runtime ends the
others), and in-process its state then differs, so the next call raises on every rank.
A weight sync, whose failure must leave every rank awaiting a full sync, ends in a second
all-gather of error flags.

torch.distributed (and megatron's parallel state) must exist before this engine: it takes the
:class:`~megatron_rl.parallel.Topology` for its replica, tp rank and control group.

Usage::

    topo = init_distributed(config.parallel, rollout_tp=config.rollout.tp)
    engine = VllmEngine(model_path, cfg=config.rollout, topo=topo, run_dir="runs/x")
    outs = engine.generate([[1, 5, 7]], sampling=Sampling(temperature=0, max_new_tokens=8))
    engine.release(["kv_cache", "weights"]); engine.resume(["weights"]) ...
"""
from __future__ import annotations

import os
import time
import zlib
from dataclasses import replace
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rl.compat import vllm_compat
from megatron_rl.models.shape import ModelShape
from megatron_rl.parallel import collectives as coll
from megatron_rl.rollout import cpu_memory
from megatron_rl.rollout.base import EngineStateError, Generation, MemoryReport, RolloutEngine, Sampling, check_tags
from megatron_rl.rollout.lifecycle import Lifecycle
from megatron_rl.rollout.routes import RouteRecorder
from megatron_rl.rollout.vllm_weights import VllmWeights, WeightUpdateError


def _set_env(cfg, run_dir: str) -> None:
    """Settings vLLM reads from the environment; existing values win."""
    cache = os.path.join(os.path.abspath(run_dir), ".cache")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cfg.omp_threads_bind)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(cache, "vllm"))


def _is_moe(model_path: str) -> bool:
    """Whether the HF model at ``model_path`` is a mixture of experts (by the layout algebra's shape)."""
    from transformers import AutoConfig  # lazy: keeps vLLM/megatron out of CLI start-up

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(model_path)).moe is not None


class VllmEngine(RolloutEngine):
    """The vLLM rollout engine for one rank of an SPMD job."""

    def __init__(self, model_path: str, *, cfg, topo, run_dir: str, dtype: str = "float32"):
        if not dist.is_initialized():
            raise EngineStateError("initialise torch.distributed (and megatron parallel state) before VllmEngine")
        self.cfg, self.run_dir, self.topo = cfg, run_dir, topo
        self.rank, self.world = topo.rank, topo.world_size
        if topo.rollout.tp != cfg.tp:
            raise EngineStateError(f"rollout.tp={cfg.tp} but the topology was built for rollout tp "
                                   f"{topo.rollout.tp}; fix: init_distributed(..., rollout_tp=cfg.rollout.tp)")
        r = topo.rollout
        self.replicas, self.replica, self.tp_rank = r.replicas, r.replica, r.tp_rank
        self.cuda = torch.cuda.is_available()
        self.group = topo.control_group  # gloo over the world, with the job's timeout
        _set_env(cfg, run_dir)
        if not self.cuda:
            vllm_compat.unique_shm_names()
        self.llm = self._make_llm(model_path, dtype)
        self.worker = vllm_compat.driver_worker(self.llm)
        self.weights = VllmWeights(vllm_compat.worker_model(self.worker), cpu=not self.cuda)
        self.model_path, self.recorder = model_path, None  # the route recorder, made on first use
        self.lc = Lifecycle(weights_release=cfg.weights_release, dummy=cfg.load_format == "dummy")
        self._calls = 0
        self._sync_dirty = False
        self.reports: list[MemoryReport] = [self.memory("started")]

    def _make_llm(self, model_path: str, dtype: str):
        from vllm import LLM  # lazy: keeps vLLM/megatron out of CLI start-up

        c = self.cfg
        kw = dict(model=model_path, tensor_parallel_size=c.tp, distributed_executor_backend="external_launcher",
                  dtype=dtype, max_model_len=c.max_model_len, enforce_eager=c.enforce_eager, seed=c.seed,
                  load_format=c.load_format, disable_log_stats=True)
        if self.cuda:
            kw.update(gpu_memory_utilization=c.gpu_memory_utilization, enable_sleep_mode=True)
        else:
            kw.update(kv_cache_memory_bytes=c.kv_cache_bytes)
        kw.update(vllm_compat.moe_engine_kwargs(moe=_is_moe(model_path), cuda=self.cuda))
        return LLM(**kw)

    # -- collectives ------------------------------------------------------------------------------

    def _gather(self, obj) -> list:
        return coll.all_gather_object(obj, group=self.group)

    def _agree(self, op: str, tags: tuple, error: Optional[str] = None) -> None:
        """All ranks must call ``op`` with the same tags from the same state, error-free.

        The common case is one all-gather of two integers (a digest of the call and state, and
        an error flag); only when they differ do the ranks exchange the texts for the message.
        """
        state = self.lc.state.short()
        digest = zlib.crc32(repr((op, tags, state)).encode())
        mine = coll.tensor([digest, 1 if error else 0], dtype=torch.int64, group=self.group)
        every = coll.all_gather(mine, group=self.group)
        if all(int(t[0]) == digest and not int(t[1]) for t in every):
            return
        seen = self._gather((tags, state, error))
        if len({(t, s) for t, s, _ in seen}) > 1:
            per_rank = "; ".join(f"rank {r}: tags={list(t)} state=({s})" for r, (t, s, _) in enumerate(seen))
            raise EngineStateError(f"{op}: ranks disagree ({per_rank}); every rank must call {op} "
                                   "together with the same tags")
        errors = [(r, e) for r, (_, _, e) in enumerate(seen) if e]
        if errors:
            raise EngineStateError(f"{op} failed on rank(s) {[r for r, _ in errors]}: {errors[0][1]}")
        raise EngineStateError(f"{op}: ranks disagree on the call digest; every rank must call {op} together")

    # -- generation -------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], *, sampling: Sampling) -> list[Generation]:
        self.lc.check_generate()
        prompts = [[int(t) for t in p] for p in prompts]
        digest = zlib.crc32(repr(prompts).encode())
        self._agree("generate", (len(prompts), digest))
        base = sampling.seed if sampling.seed is not None else (self.cfg.seed * 1_000_003 + self._calls) % (1 << 30)
        self._calls += 1
        lo, hi = self._share(len(prompts))
        mine = self._generate_local(prompts[lo:hi], sampling, seeds=[base + i for i in range(lo, hi)])
        per_rank = self._gather(mine if self.tp_rank == 0 else None)
        return [g for r in self.topo.rollout.leaders for g in per_rank[r]]

    def _share(self, n: int) -> tuple[int, int]:
        """Contiguous split (keeps a prompt's group on one replica, so its prefix is shared)."""
        q, extra = divmod(n, self.replicas)
        lo = self.replica * q + min(self.replica, extra)
        return lo, lo + q + (1 if self.replica < extra else 0)

    def _generate_local(self, prompts: list, sampling: Sampling, *, seeds: list[int]) -> list[Generation]:
        from vllm import SamplingParams  # lazy: keeps vLLM/megatron out of CLI start-up

        if not prompts:
            return []
        params = [SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                 top_p=sampling.top_p, seed=s, logprobs=0,
                                 prompt_logprobs=0 if sampling.prompt_logprobs else None,
                                 stop_token_ids=list(sampling.stop_token_ids)) for s in seeds]
        recorder = self._route_recorder() if sampling.routes else self.recorder
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for p, o in zip(prompts, outs):
            c = o.outputs[0]
            toks = list(c.token_ids)
            lps = [float(c.logprobs[i][t].logprob) for i, t in enumerate(toks)]
            plp = None
            if sampling.prompt_logprobs:
                plp = [None if d is None else float(d[p[i]].logprob) for i, d in enumerate(o.prompt_logprobs)]
            # once armed, every request files its routes (a later one may be served its cached prefix)
            routes = recorder.routes(o.request_id, p + toks) if recorder is not None else None
            result.append(Generation(prompt=p, tokens=toks, logprobs=lps, prompt_logprobs=plp,
                                     finish_reason=str(c.finish_reason), routes=routes if sampling.routes else None))
        return result

    def _route_recorder(self):
        """The CPU route capture (:class:`~megatron_rl.rollout.routes.RouteRecorder`), installed on
        first use; blocks cached before it have no routes, so the prefix cache is reset then."""
        if self.recorder is None:
            from transformers import AutoConfig  # lazy: keeps vLLM/megatron out of CLI start-up
            from megatron_rl.models.shape import ModelShape  # lazy: as above

            shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(self.model_path))
            if shape.moe is None:
                raise EngineStateError("Sampling(routes=True) needs an MoE model; this one is dense")
            self.recorder = RouteRecorder(self.worker, layers=shape.layers, topk=shape.moe.topk)
            self.reset_prefix_cache()
        return self.recorder

    # -- release / resume -------------------------------------------------------------------------

    def release(self, tags: Iterable[str]) -> MemoryReport:
        tags = check_tags(tags)
        self._agree("release", tags)
        self.lc.check_release(tags)
        before, t0 = self.memory("before_release"), time.perf_counter()
        self._cuda_release(tags) if self.cuda else self._cpu_release(tags)
        self.lc.did_release(tags)
        return self._record("released:" + "+".join(tags), before, time.perf_counter() - t0)

    def resume(self, tags: Iterable[str]) -> MemoryReport:
        tags = check_tags(tags)
        self._agree("resume", tags)
        self.lc.check_resume(tags)
        before, t0 = self.memory("before_resume"), time.perf_counter()
        self._cuda_resume(tags) if self.cuda else self._cpu_resume(tags)
        if "kv_cache" in tags:  # its blocks are gone; resumed weights are exact or await a sync (which resets)
            self.reset_prefix_cache()
        self.lc.did_resume(tags)
        return self._record("resumed:" + "+".join(tags), before, time.perf_counter() - t0)

    def _offload_path(self) -> str:
        return os.path.join(os.path.abspath(self.run_dir), "rollout-offload", f"rank{self.rank}.pt")

    def _cpu_release(self, tags: tuple) -> None:
        if "weights" in tags:
            if self.cfg.weights_release == "offload" and self.lc.state.weights == "live":
                path = self._offload_path()
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.save(self.weights.read_shards(), path)
            self.weights.drop()
            cpu_memory.return_memory_to_os()  # the packed kernels' blocks may sit on the heap
        if "kv_cache" in tags:
            cpu_memory.release_kv_pages(self.worker)

    def _cpu_resume(self, tags: tuple) -> None:
        if "weights" in tags:
            self.weights.allocate()
            if self.lc.state.weights == "offloaded":
                shards = torch.load(self._offload_path(), mmap=True)
                self.weights.begin_weight_update()
                self.weights.load_shards(shards.items())
                self.weights.end_weight_update(require_all=True)
                del shards
                os.remove(self._offload_path())
        # kv_cache: nothing to rebuild; its pages come back on first touch (see cpu_memory)

    def _cuda_release(self, tags: tuple) -> None:
        if set(tags) != {"kv_cache", "weights"}:
            raise EngineStateError("on CUDA, vLLM's sleep releases the KV cache and the weights together; "
                                   "release(['kv_cache', 'weights'])")
        self.llm.sleep(level=1 if self.cfg.weights_release == "offload" else 2)

    def _cuda_resume(self, tags: tuple) -> None:
        self.llm.wake_up(tags=list(tags))

    # -- weights ----------------------------------------------------------------------------------

    def begin_weight_update(self) -> None:
        self._agree("begin_weight_update", ())
        self.lc.did_begin_sync()
        self.weights.begin_weight_update()

    def load_shards(self, shards: Iterable[tuple[str, torch.Tensor]], *, donate: bool = False) -> int:
        if not self.lc.state.syncing:
            raise EngineStateError("load_shards() outside begin_weight_update()/end_weight_update()")
        try:
            return self.weights.load_shards(shards, donate=donate)
        except WeightUpdateError:
            self._sync_dirty = True  # a bucket may be half-written: this sync must now fill everything
            raise

    def end_weight_update(self) -> None:
        need_all, self._sync_dirty, error = self.lc.sync_needs_all() or self._sync_dirty, False, None
        try:
            self.weights.end_weight_update(require_all=need_all)
            self.reset_prefix_cache()
        except WeightUpdateError as e:
            error = str(e)
        self._finish_sync("end_weight_update", error)

    def update_weights(self, hf_named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._agree("update_weights", ())
        self.lc.did_begin_sync()
        error = None
        try:
            self.weights.update_weights_hf(self.worker, hf_named_tensors)
            self.reset_prefix_cache()
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        self._finish_sync("update_weights", error)

    def _finish_sync(self, op: str, error: Optional[str]) -> None:
        """Close a sync on every rank; any rank's failure leaves all of them awaiting a full sync."""
        failed = any(coll.gather_flags(bool(error), group=self.group))
        self.lc.did_end_sync(complete=not failed)
        if failed:  # the texts travel only on failure
            errors = [(r, e) for r, e in enumerate(self._gather(error)) if e]
            self.lc.state.weights = "awaiting_sync"  # not exact until a complete sync
            raise EngineStateError(f"{op} failed on rank(s) {[r for r, _ in errors]}: {errors[0][1]}")

    def reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise EngineStateError("vLLM refused to reset the prefix cache (requests still running)")
        if self.recorder is not None:  # routes by token prefix mirror the cache
            self.recorder.reset()

    def set_weights_release(self, mode: str) -> None:
        """Switch between ``offload`` and ``discard`` for later releases (collective)."""
        self._agree("set_weights_release", (mode,))
        self.lc.set_mode(mode)
        self.cfg = replace(self.cfg, weights_release=mode)

    # -- state and accounting ---------------------------------------------------------------------

    @property
    def state(self):
        return self.lc.state

    def memory(self, phase: str = "now") -> MemoryReport:
        # Released KV keeps its (virtual) tensors on both paths; none of its memory is held.
        kv = 0 if self.lc.state.kv_cache == "released" else cpu_memory.kv_cache_bytes(self.worker)
        rep = MemoryReport(phase=phase, kv_cache_bytes=kv, weight_bytes=self.weights.nbytes())
        if self.cuda:
            rep.allocated, rep.reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            free, total = torch.cuda.mem_get_info()
            rep.device_used = total - free
        else:
            rep.rss = cpu_memory.rss_bytes()
        return rep

    def _record(self, phase: str, before: MemoryReport, seconds: float) -> MemoryReport:
        rep = self.memory(phase)
        rep.extra = {"seconds": seconds, "kv_cache_bytes_before": before.kv_cache_bytes,
                     "weight_bytes_before": before.weight_bytes, "rss_before": before.rss,
                     "allocated_before": before.allocated}
        self.reports.append(rep)
        return rep
