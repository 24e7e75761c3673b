"""The weights of one vLLM worker: receive sharded kernel-format tensors, read, drop, refill.

On CPU, vLLM packs every linear weight after loading (a oneDNN handle for fp32, an
AMX-packed tensor for bf16) into a closure ``module.cpu_linear`` and leaves the ``weight``
Parameter empty; embeddings and the lm_head keep their Parameter *and* get a packed copy.
A plain ``param.copy_`` therefore cannot update the model. This module writes this rank's
shard (vLLM's own TP layout, names as in ``model.named_parameters()``) and re-runs vLLM's
post-load processing (the packing) for exactly the modules that changed, so a sync never
needs full HF tensors. Off CPU the parameters are ordinary tensors and are copied in place.

An MoE layer's experts are stacked by vLLM (``...experts.routed_experts.w13_weight`` ``[E, 2f, H]``,
``w2_weight`` ``[E, H, f]``); the receiver names each expert's shard ``w13_weight[j]`` /
``w2_weight[j]`` (``(2f, H)`` / ``(H, f)``, the layout algebra's names). On CPU vLLM pads and prepacks
the stack after loading, so the shards of a layer are staged unpacked and, once all have arrived (or
at the end), handed to vLLM's own CPU post-load step: the layer holds what vLLM's load leaves.

Receiver API used by the weight sync (every rank, in lockstep)::

    w = VllmWeights(model, cpu=True)
    w.begin_weight_update()
    for bucket in buckets:                      # one call per bucket
        w.load_shards([("model.layers.0.self_attn.qkv_proj.weight", shard), ...])
    w.end_weight_update()                       # re-packs embeddings; returns names loaded

Release support: :meth:`drop` frees parameters and packed closures, :meth:`allocate`
re-creates empty parameters of the right shapes, :meth:`read_shards` reads the current
weights back in kernel format (a host copy for offload).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from megatron_rl.compat import vllm_compat


class WeightUpdateError(RuntimeError):
    """A weight update that cannot be applied (unknown name, bad shape, wrong phase)."""


@dataclass(frozen=True)
class _Slot:
    """One vLLM parameter as the receiver sees it."""

    module_name: str
    attr: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    packed_linear: bool  # the live Parameter is empty; the data lives in module.cpu_linear
    expert: int = -1  # >= 0: expert ``expert`` (dim 0) of a stacked fused-experts Parameter
    packed_experts: bool = False  # that stack is held padded and prepacked (vLLM's CPU experts)


def _kernel_shape(module: torch.nn.Module, attr: str, live: torch.Tensor) -> tuple[int, ...]:
    """Unpacked shard shape: the live one, or vLLM's recorded pre-packing metadata."""
    if live.numel() > 0:
        return tuple(live.shape)
    shape = vllm_compat.recorded_shape(module, attr)
    if shape is None:
        raise WeightUpdateError(f"no recorded shape for {attr} of {type(module).__name__}")
    return shape


@dataclass
class _ExpertStage:
    """One fused-experts layer during an update: unpacked ``w13_weight`` / ``w2_weight`` stacks
    and the per-expert slot names still to come."""

    tensors: dict[str, torch.Tensor]
    missing: set[str]


class VllmWeights:
    """Kernel-format access to the parameters of one vLLM model on this rank."""

    def __init__(self, model: torch.nn.Module, *, cpu: bool, readback_chunk: int = 1024):
        self.model = model
        self.cpu = cpu
        self.readback_chunk = readback_chunk
        self.slots: dict[str, _Slot] = {}
        self._owners: dict[int, list[torch.nn.Module]] = {}  # id(Parameter) -> packed modules using it
        self._updating = False
        self._loaded: set[str] = set()
        self._repack: dict[int, torch.nn.Module] = {}
        self._expert_slots: dict[str, list[str]] = {}  # fused-experts module -> its per-expert slot names
        self._stages: dict[str, _ExpertStage] = {}  # fused-experts module -> unpacked staging (one update)
        self.dropped = False
        self._index()

    # -- discovery ------------------------------------------------------------------------------

    def _index(self) -> None:
        modules = dict(self.model.named_modules())
        self._mods = modules  # name -> module (get_submodule per call costs ms per sync)
        for name, param in self.model.named_parameters():
            mod_name, _, attr = name.rpartition(".")
            mod = modules[mod_name]
            if attr in vllm_compat.EXPERT_ATTRS and vllm_compat.is_fused_experts(mod):
                self._index_experts(name, mod_name, mod, attr, param)
                continue
            packed_linear = self.cpu and attr == "weight" and param.numel() == 0 and vllm_compat.has_cpu_linear(mod)
            self.slots[name] = _Slot(mod_name, attr, _kernel_shape(mod, attr, param), param.dtype, packed_linear)
        # Embedding-style modules keep their weight and also hold a packed copy of it; with
        # tied embeddings one Parameter feeds two such modules (embed_tokens and lm_head).
        for mod in modules.values():
            w = mod._parameters.get("weight")
            if self.cpu and vllm_compat.has_cpu_linear(mod) and w is not None and w.numel() > 0:
                self._owners.setdefault(id(w), []).append(mod)

    def _index_experts(self, name: str, mod_name: str, mod, attr: str, param) -> None:
        shape, packed = vllm_compat.expert_shapes(mod)[attr], self.cpu and vllm_compat.packed_experts(mod)
        for j in range(param.shape[0]):  # (E_local, ...): packing keeps the shape
            self.slots[f"{name}[{j}]"] = _Slot(mod_name, attr, shape, param.dtype, False, expert=j,
                                               packed_experts=packed)
            self._expert_slots.setdefault(mod_name, []).append(f"{name}[{j}]")

    def _module(self, name: str) -> torch.nn.Module:
        return self._mods[self.slots[name].module_name]

    def _param(self, name: str) -> torch.nn.Parameter:
        return getattr(self._module(name), self.slots[name].attr)

    def names(self) -> list[str]:
        return list(self.slots)

    # -- accounting -----------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held for weights on this rank: live parameters plus packed copies."""
        total = 0
        seen: set[int] = set()
        for name, slot in self.slots.items():
            p = self._param(name)
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
            if slot.packed_linear and not vllm_compat.linear_released(self._module(name)):
                total += _numel(slot.shape) * slot.dtype.itemsize
        for mods in self._owners.values():
            for mod in mods:
                if not vllm_compat.linear_released(mod) and mod.weight.numel() > 0:
                    total += mod.weight.numel() * mod.weight.element_size()
        return total

    # -- the receiver API -----------------------------------------------------------------------

    def begin_weight_update(self) -> None:
        if self.dropped:
            raise WeightUpdateError("weights are released (dropped) on this rank; "
                                    "call engine.resume(['weights']) before syncing")
        if self._updating:
            raise WeightUpdateError("begin_weight_update() called twice without end_weight_update()")
        self._updating, self._loaded, self._repack, self._stages = True, set(), {}, {}

    @torch.no_grad()
    def load_shards(self, shards: Iterable[tuple[str, torch.Tensor]], *, donate: bool = False) -> int:
        """Write this rank's shards (vLLM names, kernel layout). Returns the number written.

        ``donate=True``: the caller gives the tensors up, so a packed linear is built from the
        tensor itself instead of a private copy (one copy and its page faults fewer per sync).
        """
        if not self._updating:
            raise WeightUpdateError("load_shards() outside begin_weight_update()/end_weight_update()")
        count = 0
        for name, tensor in shards:
            slot = self.slots.get(name)
            if slot is None:
                raise WeightUpdateError(f"unknown vLLM parameter {name!r}; expected one of "
                                        f"{sorted(self.slots)[:6]}... ({len(self.slots)} names)")
            if tuple(tensor.shape) != slot.shape:
                raise WeightUpdateError(f"{name}: shard shape {tuple(tensor.shape)} != this rank's "
                                        f"vLLM shape {slot.shape}")
            if slot.packed_experts:
                self._stage_expert(name, slot, tensor)
            elif slot.expert >= 0:
                self._param(name).data[slot.expert].copy_(tensor)
            elif slot.packed_linear:
                self._pack_linear(name, slot, tensor, donated=donate)
            else:
                param = self._param(name)
                param.data.copy_(tensor)
                for mod in self._owners.get(id(param), []):
                    self._repack[id(mod)] = mod
            self._loaded.add(name)
            count += 1
        return count

    def end_weight_update(self, *, require_all: bool = False) -> set[str]:
        """Re-pack the embedding-style modules that changed. Returns the names loaded."""
        if not self._updating:
            raise WeightUpdateError("end_weight_update() without begin_weight_update()")
        self._updating = False
        for mod_name in list(self._stages):  # layers whose experts arrived only in part
            self._flush_experts(mod_name)
        for mod in self._repack.values():
            vllm_compat.repack(mod)
        self._repack = {}
        missing = set(self.slots) - self._loaded
        if require_all and missing:
            raise WeightUpdateError(f"weight sync left {len(missing)} parameters unfilled, e.g. {sorted(missing)[:3]}, "
                                    "but the weights were discarded, dummy or partly written; "
                                    "fix: sync every parameter")
        return set(self._loaded)

    def _pack_linear(self, name: str, slot: _Slot, tensor: torch.Tensor, *, donated: bool = False) -> None:
        mod = self._module(name)
        if donated and tensor.is_contiguous() and tensor.dtype == slot.dtype and tensor.device.type == "cpu":
            data = tensor  # ours now: whatever the packing keeps of it, nobody else writes it
        else:  # a private contiguous copy: the packing must never alias the sender's buffer
            data = torch.empty(slot.shape, dtype=slot.dtype)
            data.copy_(tensor)
        mod.weight = torch.nn.Parameter(data, requires_grad=False)
        # vLLM's own CPU post-load step (dispatch_cpu_unquantized_gemm, remove_weight=True):
        # builds the packed closure and leaves the Parameter empty again.
        vllm_compat.repack(mod)

    def _stage_expert(self, name: str, slot: _Slot, tensor: torch.Tensor) -> None:
        stage = self._stages.get(slot.module_name)
        if stage is None:
            mod, names = self._mods[slot.module_name], self._expert_slots[slot.module_name]
            if mod.w13_weight.numel() > 0:  # keep the experts this update does not overwrite
                w13, w2 = vllm_compat.unpack_experts(mod)
            else:  # released: nothing to keep
                e, shapes = len(names) // 2, vllm_compat.expert_shapes(mod)
                w13, w2 = (torch.zeros((e, *shapes[a]), dtype=slot.dtype) for a in vllm_compat.EXPERT_ATTRS)
            stage = self._stages[slot.module_name] = _ExpertStage({"w13_weight": w13, "w2_weight": w2}, set(names))
        stage.tensors[slot.attr][slot.expert].copy_(tensor)
        stage.missing.discard(name)
        if not stage.missing:  # the whole layer is here: pack it now (one layer staged at a time)
            self._flush_experts(slot.module_name)

    def _flush_experts(self, mod_name: str) -> None:
        stage = self._stages.pop(mod_name)
        vllm_compat.repack_experts(self._mods[mod_name], stage.tensors["w13_weight"], stage.tensors["w2_weight"])

    def _read_experts(self, cache: dict, name: str, slot: _Slot) -> torch.Tensor:
        mod = self._mods[slot.module_name]
        if slot.module_name not in cache:
            cache[slot.module_name] = dict(zip(vllm_compat.EXPERT_ATTRS, vllm_compat.unpack_experts(mod))) \
                if slot.packed_experts else {a: getattr(mod, a).detach() for a in vllm_compat.EXPERT_ATTRS}
        return cache[slot.module_name][slot.attr][slot.expert].clone()

    # -- full HF tensors (vLLM slices them per rank): the baseline path -------------------------

    def update_weights_hf(self, worker, hf_named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors through vLLM's layerwise reload (checkpoint format)."""
        if self.dropped:
            raise WeightUpdateError("weights are released on this rank; call engine.resume(['weights']) first")
        experts = [self._mods[m] for m in self._expert_slots]
        with vllm_compat.experts_reload_as_first_load(experts):  # vLLM's reload skips the CPU experts' prepack
            worker.reload_weights(weights_iterator=iter(hf_named_tensors), is_checkpoint_format=True)
        # vLLM's layerwise reload processes a tied Parameter through one module only (embed_tokens),
        # leaving the lm_head's packed copy stale on CPU: re-pack every embedding-style owner.
        for mods in self._owners.values():
            for mod in mods:
                vllm_compat.repack(mod)

    # -- release support ------------------------------------------------------------------------

    @torch.no_grad()
    def read_shards(self) -> dict[str, torch.Tensor]:
        """A host copy of every parameter in kernel format (this rank's shard)."""
        if self.dropped:
            raise WeightUpdateError("cannot read weights: they are released on this rank")
        out, experts = {}, {}
        for name, slot in self.slots.items():
            if slot.expert >= 0:
                out[name] = self._read_experts(experts, name, slot)
            else:
                out[name] = self._read_linear(name, slot) if slot.packed_linear else self._param(name).detach().clone()
        return out

    def _read_linear(self, name: str, slot: _Slot) -> torch.Tensor:
        # The packed kernel is opaque, so run it on identity rows: I_c @ W^T = W[:, chunk]^T.
        # Products with 0 and 1 and sums with 0 are exact, so this is bitwise W.
        mod = self._module(name)
        n, k = slot.shape
        out = torch.empty(n, k, dtype=slot.dtype)
        for start in range(0, k, self.readback_chunk):
            c = min(self.readback_chunk, k - start)
            eye = torch.zeros(c, k, dtype=slot.dtype)  # (c, K)
            eye[:, start:start + c] = torch.eye(c, dtype=slot.dtype)
            out[:, start:start + c] = vllm_compat.run_linear(mod, eye).t()  # (c, N) -> (N, c)
        return out

    def drop(self) -> None:
        """Free every weight byte on this rank (parameters and packed closures)."""
        for name, slot in self.slots.items():
            mod = self._module(name)
            if slot.packed_linear:
                vllm_compat.release_linear(mod)
            self._param(name).data = torch.empty(0, dtype=slot.dtype)
        for mods in self._owners.values():
            for mod in mods:
                vllm_compat.release_linear(mod)
        self.dropped = True

    def allocate(self) -> None:
        """Re-create uninitialised parameters (contents arrive with the next sync)."""
        for name, slot in self.slots.items():
            if not slot.packed_linear and slot.expert < 0:  # a stacked expert stays empty until its sync
                self._param(name).data = torch.empty(slot.shape, dtype=slot.dtype)
        self.dropped = False


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

