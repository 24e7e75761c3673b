"""A quiet console: each rank's own output goes to its log file; the console gets only our messages.

The launch scripts (``launch/torchrun.sh``, ``launch/slurm.sbatch``) start torchrun with
``--log-dir`` and without ``--tee``/``--redirects`` when ``logging.verbose=false`` (the default),
and set ``MEGATRON_RL_CONSOLE=quiet`` for the ranks. Every rank then calls :func:`capture` first
thing (``megatron-rl``'s entry point does; ``python -m megatron_rl.console SCRIPT`` does it for a
script job), before any library is imported (this module imports none, not even torch):

- file descriptors 1 and 2 of the process are pointed at ``stdout.log`` / ``stderr.log`` in the
  directory torchrun made for this rank (where ``TORCHELASTIC_ERROR_FILE`` lives, the same files
  torchrun's own redirects would write), so vLLM's, torch's and C++ output, warnings and
  tracebacks all land there;
- the console itself (the inherited stdout and stderr) is kept as :func:`stdout` / :func:`stderr`:
  rank 0 writes its progress bar, phase tables and our messages there, and any rank writes its
  failure there at once, ``[rank N] FAILED in phase ...`` (and into its log).

``logging.verbose=true``: the launch scripts tee rank 0's whole output to the console instead, as
torchrun does (``--tee 3 --local-ranks-filter 0``, with torchrun's ``[default0]:`` prefixes);
:func:`capture` then does nothing and :func:`stdout` / :func:`stderr` are ``sys.stdout`` /
``sys.stderr``. So it is without a launch script (plain ``torchrun`` or ``python``): nothing is
captured and the console shows everything.

Usage::

    console.capture()                      # first thing in a rank's main()
    print("step 3 ...", file=console.stderr())
    console.say("[rank 2] FAILED ...")     # the console's stderr and, when captured, this rank's log
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Optional, TextIO

ENV = "MEGATRON_RL_CONSOLE"  # "quiet": capture (set by the launch scripts); anything else: do nothing
_console: dict = {}  # "out", "err": the console's streams once captured


def log_dir() -> Optional[str]:
    """The directory torchrun (``--log-dir``) made for this rank, or None."""
    err_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    return os.path.dirname(err_file) if err_file else None


def capture() -> bool:
    """Under a quiet launch, send this process's stdout/stderr (fds 1, 2) to its log files and
    keep the console for :func:`stdout` / :func:`stderr`. Returns whether output is captured
    (idempotent)."""
    if _console:
        return True
    where = log_dir()
    if os.environ.get(ENV) != "quiet" or not where:
        return False
    os.makedirs(where, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, key, name in ((1, "out", "stdout.log"), (2, "err", "stderr.log")):
        _console[key] = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
        log_fd = os.open(os.path.join(where, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, fd)
        os.close(log_fd)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node: where its ranks' output went
        print(f"[console] rank output (vLLM, torch, warnings) is in {os.path.dirname(where)}/<local rank>/"
              "{stdout,stderr}.log; logging.verbose=true shows rank 0's here", file=stderr(), flush=True)
    return True


def captured() -> bool:
    return bool(_console)


def stdout() -> TextIO:
    """The console's stdout for our own output lines (``sys.stdout`` when nothing is captured)."""
    return _console.get("out", sys.stdout)


def stderr() -> TextIO:
    """The console's stderr for our progress bar and messages (``sys.stderr`` when nothing is captured)."""
    return _console.get("err", sys.stderr)


def say(text: str) -> None:
    """A message on the console's stderr and, when captured, the same text in this rank's log."""
    print(text, file=stderr(), flush=True)
    if _console:
        print(text, file=sys.stderr, flush=True)


def main(argv: Optional[list] = None) -> int:
    """``python -m megatron_rl.console SCRIPT [ARGS]``: capture, then run SCRIPT as __main__."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m megatron_rl.console SCRIPT [ARGS]", file=sys.stderr)
        return 2
    capture()
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of the module: capture into the one
    # that megatron_rl's code imports, so that stdout()/stderr() there see the console.
    from megatron_rl import console as _imported

    sys.exit(_imported.main())
