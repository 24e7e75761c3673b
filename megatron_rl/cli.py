"""The ``megatron-rl`` console script. Each subcommand lives in its own module; this file
only dispatches, importing the module lazily so that ``--help`` is instant.

    megatron-rl train --config configs/tiny_cpu.yaml train.steps=20     # under torchrun
    megatron-rl convert --help
    megatron-rl plot runs/demo                                          # -> runs/demo/metrics.png
"""
import importlib
import sys

from megatron_rl import console

COMMANDS = {
    "train": ("megatron_rl.trainer", "GRPO/PPO training job (run under torchrun)"),
    "lm-train": ("megatron_rl.train.lm_job", "language-model training job on megatron-core (run under torchrun)"),
    "convert": ("megatron_rl.checkpoint.convert", "HF <-> Megatron checkpoint conversion and offline reshard"),
    "make-tiny-model": ("megatron_rl.models.tiny", "build a tiny random HF model and tokenizer, offline"),
    "plan": ("megatron_rl.plan.command", "check a cluster job's memory, shapes and weight sync from one CPU box"),
    "preflight": ("megatron_rl.runtime.preflight", "check ranks, devices, versions and config before a job"),
    "plot": ("megatron_rl.plot", "PNG of a run's reward, loss, mismatch and phase times (needs matplotlib)"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    console.capture()  # a quiet launch: this rank's output to its log, before any library loads
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: megatron-rl COMMAND [args]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:16s} {doc}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
