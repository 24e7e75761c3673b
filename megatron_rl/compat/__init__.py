"""Every patch of a framework's private behaviour lives here, one file per framework.

- ``megatron_compat`` (+ ``megatron_distopt``): megatron-core's CUDA assumptions on CPU, the
  sequence-parallel norm, and the distributed optimizer's torch-Adam fallback.
- ``vllm_compat``: vLLM's private attribute chain to the driver worker, its CPU linear closures,
  the shared-memory segment names and where the KV cache tensors live.

Each module checks the installed version against the versions it was tested with
(:func:`require_tested`), so an upgrade of megatron-core or vLLM touches one file each:
that module's ``TESTED`` tuple and whatever patch the new version breaks.
"""
from __future__ import annotations

import logging
import os

ALLOW_ENV = "MEGATRON_RL_ALLOW_UNTESTED"
_log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()


class UntestedVersionError(RuntimeError):
    """An installed framework version that the compat patches were not tested with."""


def require_tested(package: str, installed: str, tested: tuple[str, ...], *, pin: str = "") -> str:
    """Return ``installed`` if it is in ``tested``; otherwise raise one line naming the fix
    (``pip install '<pin>'``, default ``<package>==<newest tested>``), unless
    ``MEGATRON_RL_ALLOW_UNTESTED=1`` (then warn once per package and version)."""
    if installed in tested:
        return installed
    line = (f"{package} {installed} is installed but megatron_rl's patches are tested with {', '.join(tested)} only; "
            f"fix: pip install '{pin or f'{package}=={tested[-1]}'}', or set {ALLOW_ENV}=1 to run untested")
    if os.environ.get(ALLOW_ENV) != "1":
        raise UntestedVersionError(line)
    if (package, installed) not in _warned:
        _warned.add((package, installed))
        _log.warning("%s (%s=1: continuing)", line, ALLOW_ENV)
    return installed
