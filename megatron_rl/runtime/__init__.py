"""Runtime support for jobs launched by torchrun or slurm: failing fast and loudly.

- :mod:`.rank`: :class:`RankRuntime` (named phases, watchdog, process groups with a timeout)
  and :func:`run_rank` (run a job body; record, print and exit non-zero on failure);
- :mod:`.records`: per-rank status and failure records in ``<run_dir>/runtime``, and the
  root-cause verdict;
- :mod:`.report`: prints the first failure of a launch once (called by the launch scripts);
- :mod:`.launch_check`: the checks ``launch/torchrun.sh`` runs before torchrun;
- :mod:`.preflight`: ``megatron-rl preflight``, the dry run before a real job.
"""
from megatron_rl.runtime.rank import EXIT_FAILED, EXIT_HANG, RankRuntime, run_rank

__all__ = ["EXIT_FAILED", "EXIT_HANG", "RankRuntime", "run_rank"]
