"""Shared fixtures. Test tiers (markers): unit (pure CPU, no processes), multirank (real
processes over gloo via torchrun), process (spawns plain OS processes), gpu (CUDA only; skipped here)."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def pytest_configure(config):
    for name, doc in [("unit", "tier 1: pure CPU, no processes"),
                      ("multirank", "tier 2: real processes over gloo"),
                      ("process", "tier 2: spawns OS processes without a process group (not unit)"),
                      ("gpu", "tier 3: needs CUDA"),
                      ("slow", "takes more than ~30 s")]:
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU-only test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models():
    """Paths of every tiny model variant, built once per test session (deterministic by seed).

    Keys: "llama", "llama-tied", "qwen2" (tied), "qwen2-untied", "qwen3", "qwen3-tied", "qwen3-moe".
    """
    from _launch import tiny_model_paths

    return tiny_model_paths()


def pytest_terminal_summary(terminalreporter):
    """Every launch's wall time against its timeout: each must finish within half of it."""
    from _launch import LAUNCHES

    if not LAUNCHES:
        return
    tr = terminalreporter
    tr.section("launch margins (wall / timeout; each must stay under half)")
    for name, wall, timeout in sorted(LAUNCHES, key=lambda x: -x[1] / x[2]):
        flag = "  OVER HALF" if wall > timeout / 2 else ""
        tr.write_line(f"{name:32s} {wall:7.1f} s / {timeout:5.0f} s  ({wall / timeout:4.0%}){flag}")
    tr.write_line(f"{len(LAUNCHES)} launches, {sum(w for _, w, _ in LAUNCHES):.0f} s in all")
