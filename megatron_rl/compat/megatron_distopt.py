"""megatron-core's ``DistributedOptimizer`` with its torch-Adam fallback (no TE/apex): patch 9 of
``megatron_compat`` (applied with the CPU patches) and the load-time ``step`` fix (every device).
Version-guarded through ``megatron_compat.check_version``."""
from __future__ import annotations

import contextlib
import importlib

import torch

_MARK = "_megatron_rl_cpu_compat"


def patch_load():
    """Fix two bugs of ``DistributedOptimizer`` with its torch-Adam fallback (no TE/apex).

    - ``state_dict()`` asserts ``len(steps) == 1`` over the inner optimizer's states, which
      fails on a fresh optimizer (no state yet). We first give every param the state torch
      Adam would create lazily (``step`` 0 and zero moments), which changes no later update.
    - ``load_state_dict()`` assigns *one* ``step`` tensor to every param; torch Adam then
      increments it once per param per step, breaking bias correction. We un-share it.
    """
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = distrib.DistributedOptimizer
    if getattr(cls.load_state_dict, _MARK, False):
        return
    orig_load, orig_save = cls.load_state_dict, cls.state_dict

    def load_state_dict(self, state_dict):
        out = orig_load(self, state_dict)
        _unshare_steps(self.optimizer)
        return out

    def state_dict(self):
        _init_adam_state(self.optimizer)
        return orig_save(self)

    for fn, orig in ((load_state_dict, orig_load), (state_dict, orig_save)):
        setattr(fn, _MARK, True)
        fn.__wrapped__ = orig
    cls.load_state_dict, cls.state_dict = load_state_dict, state_dict


def _init_adam_state(opt) -> None:
    """Create torch Adam's lazily-initialised state for params that have none yet."""
    if not isinstance(opt, torch.optim.Adam):  # AdamW subclasses Adam
        return
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state.get(p):
                st = opt.state[p]
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _unshare_steps(opt) -> None:
    """Give every param its own ``step`` tensor."""
    for st in opt.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()



@contextlib.contextmanager
def keeps_step(optimizer):
    """ENV.md item 9, the ``KeyError: 'step'``: on load, ``DistributedOptimizer`` copies every key of
    the inner torch-Adam state (which holds ``step``) from the checkpoint's per-param tensors
    (which do not: the step travels in ``param_groups`` and is already restored). Keys missing from
    the checkpoint keep their current value. Patched on the instances, for the load only."""
    DistributedOptimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    patched = [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]
    for opt in patched:
        orig = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, *, _opt=opt, _orig=orig):
            gi, go = _opt.model_param_group_index_map[model_param]
            main = _opt.optimizer.param_groups[gi]["params"][go]
            return _orig(model_param, {**_opt.optimizer.state.get(main, {}), **tensors})

        opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
