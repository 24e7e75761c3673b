"""Print the first failure of a launch, once, as the headline of the failure report.

Run by ``launch/torchrun.sh`` and ``launch/slurm.sbatch`` after torchrun exits non-zero::

    python -m megatron_rl.runtime.report --run-dir runs/x --exit-code 1

It reads the records the ranks left in ``<run_dir>/runtime/`` (see
:mod:`megatron_rl.runtime.records`), prints a block whose first line names the failing
rank, host, phase and exception, and keeps the same text in ``runtime/FAILURE.txt``.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_rl.runtime.records import attempt_dir, first_cause, load_records, root_cause, runtime_dir

RULE = "=" * 100


def format_report(run_dir: str, *, exit_code: int, rendezvous: str = "", nnodes: str = "",
                  rdzv_timeout: str = "") -> str:
    records = load_records(run_dir)
    verdict = root_cause(records)
    if verdict is None and not records["status"] and rendezvous:
        head = (f"FIRST FAILURE: no rank started: the rendezvous at {rendezvous} did not gather NNODES={nnodes} "
                f"node(s) within RDZV_TIMEOUT={rdzv_timeout} s, or start-up failed (see above); fix: start every "
                "node with the same NNODES, RDZV_ID and MASTER_ADDR:MASTER_PORT")
        details = []
    elif verdict is None:
        head = (f"FIRST FAILURE: no rank recorded a failure; torchrun exited {exit_code} "
                "(rendezvous or start-up failed before the job ran: see the lines above)")
        details = []
    else:
        head, details = f"FIRST FAILURE: {verdict[0]}", verdict[1]
    lines = [RULE, head] + [f"  {d}" for d in details]
    failed = {f["rank"] for f in records["failures"]} | {s["rank"] for s in records["status"]
                                                          if s.get("state") == "running"}
    for s in records["status"]:
        if s["rank"] in failed and s.get("logs"):
            lines.append(f"  rank {s['rank']} log: {s['logs'].get('stderr')}")
    lines += _earlier_attempts(run_dir)
    lines.append(f"  every rank's record: {runtime_dir(run_dir)}/ranks, logs: {run_dir}/logs")
    lines.append(RULE)
    return "\n".join(lines)


def _earlier_attempts(run_dir: str) -> list:
    """One line per earlier attempt of a restarted launch (MAX_RESTARTS): who failed there."""
    out, k = [], 0
    while os.path.isdir(attempt_dir(run_dir, k)):
        cause = first_cause(load_records(run_dir, attempt=k))
        what = "no failure record" if cause is None else (
            f"rank {cause.get('rank')} {cause['how']} in phase '{cause.get('phase')}' at step {cause.get('step')}")
        out.append(f"  earlier attempt {k} (then restarted): {what}; records: {attempt_dir(run_dir, k)}")
        k += 1
    return out


def restart_line(run_dir: str, *, attempt: int, max_restarts: str, resumed: int) -> str:
    """The one line a restarted job logs: which restart, the rank that died (from the previous
    attempt's records) and where it died, and the step it resumes from (``resumed``: the next
    step to run; 0 when there was no complete checkpoint)."""
    cause = first_cause(load_records(run_dir, attempt=attempt - 1))
    if cause is None:
        who = f"attempt {attempt - 1} left no failure record (see the torchrun output)"
    else:
        at = "" if cause.get("step") is None else f" at step {cause['step']}"
        who = (f"rank {cause.get('rank')} (host {cause.get('host')}, pid {cause.get('pid')}) {cause['how']} "
               f"in phase '{cause.get('phase')}'{at}")
    where = (f"resumed from the checkpoint of step {resumed - 1}, next step {resumed}" if resumed > 0
             else "no complete checkpoint: started again at step 0")
    return f"[restart] restart {attempt} of {max_restarts}: {who}; {where}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_rl.runtime.report", description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--exit-code", type=int, default=1)
    ap.add_argument("--rendezvous", default="", help="host:port, to explain a launch where no rank started")
    ap.add_argument("--nnodes", default="")
    ap.add_argument("--rdzv-timeout", default="")
    args = ap.parse_args(argv)
    text = format_report(args.run_dir, exit_code=args.exit_code, rendezvous=args.rendezvous, nnodes=args.nnodes,
                         rdzv_timeout=args.rdzv_timeout)
    os.makedirs(runtime_dir(args.run_dir), exist_ok=True)
    with open(os.path.join(runtime_dir(args.run_dir), "FAILURE.txt"), "w") as f:
        f.write(text + "\n")
    print(text, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
