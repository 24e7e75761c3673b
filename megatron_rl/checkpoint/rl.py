"""RL checkpoints: the whole training state of a GRPO job, saved atomically, resumed bitwise.

A checkpoint directory ``<root>/step_<k>`` holds

- ``dist/``: one megatron-core ``dist_checkpointing`` (torch_dist) checkpoint of the model chunks
  *and* the megatron optimizer (its sharded state dict; the distributed optimizer uses the
  ``fully_reshardable`` format), so both reshard on load like any megatron-core checkpoint;
- ``rng/rank<r>.pt``: every rank's own RNG states (python, numpy, torch CPU, CUDA if present,
  megatron's model-parallel RNG tracker);
- ``state.pt``: the step and the caller's ``extra`` (data position, reward history, ...);
- ``config.json``: the config the run used (when given);
- ``COMPLETE``: written last, with metadata (step, world size, time, versions, and ``policy``:
  the source HF model's absolute path and the layout and dtype the policy was saved at, which
  ``megatron-rl convert rl-to-hf`` needs to export it; see :func:`policy_source`).

Saves are atomic. Every rank writes into ``<root>/step_<k>.tmp-<uuid>``; after all ranks report
success (a barrier under the process-group timeout), rank 0 writes ``COMPLETE``, fsyncs, and
renames the directory to ``step_<k>``. A kill at any point before the rename leaves only a
``.tmp-`` directory, which :func:`latest_checkpoint` never considers and the next save removes.
Only the ``keep`` newest complete checkpoints are kept.

Fault seam for tests: the save fires ``runtime.faults`` point ``"checkpoint:after_shards"`` once
the model and optimizer shards are on disk and before ``COMPLETE``; a no-op unless a test installs
a hook (tests/workers/ckpt_fault_cli.py kills the job there).

Usage (every rank, collective)::

    save_rl_checkpoint("runs/x/ckpt", step=9, model=chunks, optimizer=opt, extra={"data": ds.state_dict()})
    got = load_rl_checkpoint("runs/x/ckpt", model=chunks, optimizer=opt)   # None, or (step, extra)

and, in one process, what an export needs (the critic in ``critic/`` is never the policy)::

    src = policy_source("runs/x/ckpt", step=None)     # the newest complete step; its dist/ and HF dir
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
import uuid
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_rl.checkpoint import CheckpointError
from megatron_rl.checkpoint import megatron as mio
from megatron_rl.checkpoint.publish import publish_marked
from megatron_rl.compat import megatron_distopt
from megatron_rl.parallel import collectives as coll
from megatron_rl.parallel.topology import model_shard
from megatron_rl.runtime import faults


COMPLETE = "COMPLETE"
POLICY_KEY = "model"  # the policy's key in dist/ (beside "optimizer"), as megatron-training's
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^step_\d+\.tmp-[0-9a-f]+(\.old)?$")  # .old: a replaced step (publish_dir)
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Finding checkpoints (pure file-system; no process group).


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the complete checkpoints under ``root``, oldest first."""
    if not root or not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, COMPLETE)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root`` (half-written ones are ignored), or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def read_complete(path: str) -> dict:
    with open(os.path.join(path, COMPLETE)) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class PolicySource:
    """An RL checkpoint's policy, as an export reads it: ``dist`` (megatron-core dist checkpoint
    of the policy, beside its optimizer state), the HF directory of its config and tokenizer,
    and the layout and dtype it was saved at."""

    step: int
    path: str  # the step_<k> directory
    hf_dir: str
    tp: int
    pp: int
    vocab_divisible_by: int
    param_dtype: str

    @property
    def dist_dir(self) -> str:
        return os.path.join(self.path, "dist")  # critic/ holds PPO's value model: never the policy


def _marked_step(path: str) -> int:
    try:
        return int(read_complete(path)["step"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}/{COMPLETE}: corrupt, no step in it; fix: pass the run's checkpoint.dir "
                              "and --step") from None


def _pick_step(root: str, step: Optional[int]) -> tuple[int, str]:
    """``(step, path)`` of the requested (or newest) complete checkpoint under ``root``."""
    if os.path.isfile(os.path.join(root, COMPLETE)):  # a step_<k> directory itself
        got = _marked_step(root)
        if step is not None and step != got:
            raise CheckpointError(f"--step {step}: --src {root} is the checkpoint of step {got}; fix: pass its "
                                  "parent directory (checkpoint.dir) with --step, or drop --step")
        return got, root
    if not os.path.isdir(root):
        raise CheckpointError(f"--src {root}: does not exist; fix: pass the run's checkpoint.dir (the directory "
                              "holding step_<k>/)")
    found = dict(complete_checkpoints(root))
    if not found:
        half = sorted(n for n in os.listdir(root) if n.startswith("step_"))
        raise CheckpointError(f"--src {root}: no complete checkpoint (step_<k>/{COMPLETE})"
                              + (f", only half-written {half[:3]}" if half else "")
                              + "; fix: pass the run's checkpoint.dir, after a save finished (checkpoint.save_every)")
    if step is None:
        step = max(found)
    if step not in found:
        raise CheckpointError(f"--step {step}: no complete checkpoint step_{step} under {root} (complete steps: "
                              f"{sorted(found)}); fix: pass one of them, or drop --step for the newest")
    return step, found[step]


def policy_source(root: str, *, step: Optional[int] = None, hf_dir: Optional[str] = None) -> PolicySource:
    """Validate the policy of checkpoint ``root`` (``checkpoint.dir`` or one ``step_<k>``; the
    newest complete step unless ``step``) for export, before any process starts. ``hf_dir``
    overrides the recorded HF source (config and tokenizer). Raises :class:`CheckpointError`."""
    step, path = _pick_step(os.path.abspath(root), step)
    if not os.path.isfile(os.path.join(path, "dist", "metadata.json")):
        raise CheckpointError(f"{path}/dist/metadata.json: missing, the policy's shards are incomplete; "
                              "fix: export another step (--step)")
    try:
        pol = read_complete(path).get("policy")
    except (ValueError, AttributeError) as e:  # not JSON, or not an object
        raise CheckpointError(f"{path}/{COMPLETE}: corrupt ({type(e).__name__}); fix: export another step "
                              "(--step)") from None
    pol = pol or _policy_from_config(path)
    hf = os.path.abspath(hf_dir or pol["hf_path"])
    if not os.path.isfile(os.path.join(hf, "config.json")):
        raise CheckpointError(f"{hf}/config.json: missing, the policy's HF source is not here; fix: pass "
                              "--hf-config DIR, the HF model the run trained (its config.json and tokenizer)")
    return PolicySource(step=step, path=path, hf_dir=hf, tp=int(pol["tp"]), pp=int(pol["pp"]),
                        vocab_divisible_by=int(pol["vocab_divisible_by"]), param_dtype=str(pol["param_dtype"]))


def _policy_from_config(path: str) -> dict:
    """A checkpoint saved before ``COMPLETE`` recorded ``policy``: the same facts from its config.json."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f) or {}
        return {"hf_path": cfg["model"]["hf_path"], "tp": cfg["parallel"]["tp"], "pp": cfg["parallel"]["pp"],
                "vocab_divisible_by": cfg["model"]["make_vocab_size_divisible_by"],
                "param_dtype": cfg["model"]["dtype"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/{COMPLETE}: records no policy and config.json cannot supply it "
                              f"({type(e).__name__}: {e}); fix: export with the run that saved it, or re-save "
                              "the checkpoint with this version") from None


# ---------------------------------------------------------------------------------------------
# State pieces.


def rng_state() -> dict:
    """This rank's RNG states: python, numpy, torch CPU, CUDA (if present), megatron's tracker."""
    # lazy: keeps vLLM/megatron out of CLI start-up
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    try:
        state["tracker"] = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    except Exception:  # tracker not initialised (no megatron parallel state)
        state["tracker"] = None
    return state


def set_rng_state(state: dict) -> None:
    # lazy: keeps vLLM/megatron out of CLI start-up
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker"):
        get_cuda_rng_tracker().set_states(state["tracker"])


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _model_sharded(chunks: list) -> dict:
    """megatron-training's layout: ``model`` for one chunk, ``model0..`` for virtual PP chunks."""
    if len(chunks) == 1:
        return {POLICY_KEY: mio.unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": mio.unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _is_distributed(optimizer) -> bool:
    # lazy: keeps vLLM/megatron out of CLI start-up
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _sharded_state(chunks: list, optimizer, *, is_loading: bool) -> dict:
    state = _model_sharded(chunks)
    if optimizer is not None:
        meta = {"distrib_optim_sharding_type": "fully_reshardable"} if _is_distributed(optimizer) else None
        model_sd = {k: v for k, v in state.items()}
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=meta)
    return state


def _policy_meta(chunks: list, config) -> Optional[dict]:
    """What rebuilds the policy without the run: its HF source (absolute) and saved layout."""
    model_cfg = getattr(config, "model", None)
    if model_cfg is None:  # saved without the run's config (a test's direct save)
        return None
    shard = model_shard(chunks[0])
    dtype = next(iter(mio.local_params(chunks[0]).values())).dtype
    return {"hf_path": os.path.abspath(model_cfg.hf_path), "tp": shard.tp, "pp": shard.pp,
            "vocab_divisible_by": model_cfg.make_vocab_size_divisible_by,
            "param_dtype": str(dtype).replace("torch.", "")}


def _config_dict(config) -> Optional[dict]:
    if config is None:
        return None
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


# ---------------------------------------------------------------------------------------------
# Save.


def _all_ok(ok: bool, *, what: str) -> None:
    """Barrier that also agrees on success (every rank raises if any rank failed)."""
    flag = coll.tensor([1 if ok else 0], dtype=torch.int32)  # on the default group's device
    coll.all_reduce(flag, op="min")  # bounded by the process group's timeout
    if int(flag.item()) != 1:
        raise CheckpointError(f"{what}: a rank failed while writing the checkpoint (see that rank's error); "
                              "fix: check free disk space and permissions of checkpoint.dir")


def _prune(root: str, *, keep: int, current: str) -> None:
    for name in os.listdir(root):
        if _TMP_DIR.match(name) and os.path.join(root, name) != current:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # left by a killed save
    for _, path in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def save_rl_checkpoint(root: str, *, step: int, model, optimizer, extra: Optional[dict] = None, keep: int = 2,
                       config=None, critic: Optional[tuple] = None) -> str:
    """Save the full RL state as ``<root>/step_<step>`` (collective; atomic). Returns its path.

    ``model``: the megatron chunks (DDP-wrapped or not); ``optimizer``: the megatron optimizer
    (or None); ``extra``: picklable caller state (data position, reward history, ...);
    ``config``: the run's config dataclass, saved as ``config.json``; ``critic``: PPO's value
    model as ``(chunks, optimizer)``, saved beside the policy in ``critic/`` (resident while saving).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    root = os.path.abspath(root)
    box = [None]
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        box[0] = os.path.join(root, f"step_{step}.tmp-{uuid.uuid4().hex[:12]}")
        os.makedirs(os.path.join(box[0], "dist"))
        os.makedirs(os.path.join(box[0], "rng"))
    box[0] = coll.broadcast_object(box[0], src=0)
    tmp = box[0]
    from megatron.core import dist_checkpointing  # lazy: keeps vLLM/megatron out of CLI start-up

    dist_checkpointing.save(_sharded_state(_chunks(model), optimizer, is_loading=False), os.path.join(tmp, "dist"))
    if critic is not None:
        if rank == 0:
            os.makedirs(os.path.join(tmp, "critic"))
        coll.barrier()
        dist_checkpointing.save(_sharded_state(_chunks(critic[0]), critic[1], is_loading=False),
                                os.path.join(tmp, "critic"))
    faults.fire("checkpoint:after_shards", step=step, rank=rank)
    ok = True
    try:
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank{rank}.pt"))
        if rank == 0:
            torch.save({"step": step, "extra": extra or {}}, os.path.join(tmp, "state.pt"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(_config_dict(config), f, indent=2, sort_keys=True, default=str)
    except OSError as e:
        print(f"rank {rank}: checkpoint write failed in {tmp}: {e}", flush=True)
        ok = False
    _all_ok(ok, what=tmp)
    final = os.path.join(root, f"step_{step}")
    if rank == 0:
        publish_marked(tmp, final, marker=COMPLETE, meta={"step": step, "world_size": world, "time": time.time(),
                                   "format_version": FORMAT_VERSION, "versions": mio.versions(),
                                   "policy": _policy_meta(_chunks(model), config)})
        _prune(root, keep=keep, current=final)
    coll.barrier()
    return final


# ---------------------------------------------------------------------------------------------
# Load.


def _load_model_and_optimizer(path: str, chunks: list, optimizer, *, sub: str = "dist") -> None:
    from megatron.core import dist_checkpointing  # lazy: keeps vLLM/megatron out of CLI start-up

    loaded = dist_checkpointing.load(_sharded_state(chunks, optimizer, is_loading=True), os.path.join(path, sub))
    keys = [POLICY_KEY] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        missing, unexpected = mio.unwrap(chunk).load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}); fix: resume with the model it was saved from")
    if optimizer is not None:
        with megatron_distopt.keeps_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])


def load_rl_checkpoint(root: str, *, model, optimizer, path: Optional[str] = None,
                       restore_rng: bool = True, critic: Optional[tuple] = None) -> Optional[tuple[int, dict]]:
    """Load the newest complete checkpoint under ``root`` (or ``path``) into ``model``/``optimizer``
    (and ``critic``'s ``(chunks, optimizer)``) and this rank's RNG states (collective). Returns
    ``(step, extra)``, or None if there is none."""
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [path if path is not None else (latest_checkpoint(root) if rank == 0 else None)]
    box[0] = coll.broadcast_object(box[0], src=0)  # every rank resumes the same checkpoint
    path = box[0]
    if path is None:
        return None
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise CheckpointError(f"{path}: no {COMPLETE} marker, the checkpoint is half-written; "
                              "fix: resume from an older step_<k> directory")
    meta = read_complete(path)
    _load_model_and_optimizer(path, _chunks(model), optimizer)
    if critic is not None:
        if not os.path.isdir(os.path.join(path, "critic")):
            raise CheckpointError(f"{path}: holds no critic (saved by a run without one); fix: resume with the "
                                  "algorithm it was saved with, or start fresh (checkpoint.resume=false)")
        _load_model_and_optimizer(path, _chunks(critic[0]), critic[1], sub="critic")
    rng_file = os.path.join(path, "rng", f"rank{rank}.pt")
    if restore_rng:
        if meta.get("world_size") == world and os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        elif rank == 0:
            print(f"{path}: saved at world size {meta.get('world_size')}, resumed at {world}: "
                  "RNG states not restored (the run continues, but not bitwise)", flush=True)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    coll.barrier()
    return int(state["step"]), state["extra"]
