"""Tier 1: the metrics logger (JSONL, TensorBoard, rank-0 only, resume truncation), the phase
timer's time and memory figures, and the per-step statistics by hand."""
import glob
import io
import time

import pytest

from megatron_rl.metrics import (PHASES, STEP_FIELDS, MetricsLogger, PhaseTimer, ascii_curve, length_stats,
                                 phase_table, read_metrics, reward_gain, reward_stats)

pytestmark = pytest.mark.unit


def test_reward_and_length_stats_by_hand():
    st = reward_stats([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5], group_size=4)
    assert st["reward/mean"] == pytest.approx(0.5)
    assert st["reward/std"] == pytest.approx(((4 * 0.25) / 8) ** 0.5)  # population std over all 8
    assert (st["reward/min"], st["reward/max"]) == (0.0, 1.0)
    assert st["reward/zero_adv_groups"] == 0.5  # the second group is all 0.5
    ln = length_stats([3, 16, 16, 5], max_new_tokens=16)
    assert ln == {"response_len/mean": 10.0, "response_len/max": 16.0, "response_len/truncated_frac": 0.5}


def test_reward_gain_and_curve():
    vals = [0.0] * 5 + [0.5] * 10 + [1.0] * 5
    assert reward_gain(vals) == (0.0, 1.0, 1.0)  # 20% of 20 = the first and last 4
    assert reward_gain([0.1, 0.3]) == pytest.approx((0.1, 0.3, 0.2))
    curve = ascii_curve(vals, height=4)
    lines = curve.splitlines()
    assert len(lines) == 5 and lines[0].startswith("  1.000 |") and lines[3].startswith("  0.000 |")
    assert lines[0].count("*") == 5 and lines[3].count("*") == 20


def test_phase_timer_time_and_memory():
    timer = PhaseTimer()
    with timer.phase("rollout"):
        time.sleep(0.05)
    with timer.phase("train"):
        blob = bytearray(64 << 20)  # 64 MiB, touched so RSS counts it
        blob[::4096] = b"\x01" * len(blob[::4096])
    with timer.phase("train"):  # a phase may run twice; times add up
        time.sleep(0.02)
    keep = blob  # noqa: F841  (still alive at the end of the step)
    m = timer.step_metrics()
    assert 0.05 <= m["time/rollout_s"] < 2.0  # loose: the machine is shared
    assert m["time/train_s"] >= 0.02
    assert m["time/step_s"] >= m["time/rollout_s"] + m["time/train_s"]
    assert m["mem/train_mib"] - m["mem/rollout_mib"] > 48, m  # the 64 MiB shows in RSS
    assert timer.step_metrics().keys() == {"time/step_s"}  # reset for the next step
    table = phase_table(m)
    assert table.splitlines()[0].split() == ["phase", "time_s", "share", "mem_mib"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["rollout", "train", "step"]


def test_logger_jsonl_tensorboard_progress_and_resume(tmp_path):
    run = str(tmp_path / "run")
    out = io.StringIO()
    log = MetricsLogger(run, rank=0, total_steps=4, tensorboard=True, stream=out)
    import torch

    for step in range(3):
        log.log(step, {"reward/mean": 0.1 * step, "loss": torch.tensor(1.5), "bad": float("nan")})
    log.print("hello from rank 0")
    log.close()
    rows = read_metrics(f"{run}/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["reward/mean"] == pytest.approx(0.1)
    assert rows[0]["loss"] == 1.5 and rows[0]["bad"] is None  # tensors become floats; NaN becomes null
    assert "hello from rank 0" in out.getvalue() and "3/4" in out.getvalue()
    events = glob.glob(f"{run}/tb/events.out.tfevents.*")
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(events[0])
    acc.Reload()
    assert [round(e.value, 6) for e in acc.Scalars("reward/mean")] == [0.0, 0.1, 0.2]

    # a resumed run starting at step 1 drops the old steps >= 1 first
    log = MetricsLogger(run, rank=0, total_steps=4, start_step=1, progress=False)
    log.log(1, {"reward/mean": 9.0})
    log.close()
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(f"{run}/metrics.jsonl")] == [(0, 0.0), (1, 9.0)]
    # ... and keeps what it dropped beside the file
    assert [(r["step"], round(r["reward/mean"], 6)) for r in read_metrics(f"{run}/metrics.replaced.jsonl")] == \
        [(1, 0.1), (2, 0.2)]


def test_other_ranks_are_silent(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(str(tmp_path / "r1"), rank=1, total_steps=2, tensorboard=True, stream=out)
    log.log(0, {"reward/mean": 1.0})
    log.print("should not appear")
    log.close()
    assert out.getvalue() == "" and not (tmp_path / "r1").exists()


def test_step_fields_are_exactly_what_the_producers_write():
    """STEP_FIELDS (what the e2e test demands of every row) against the keys the code that fills a
    row really returns: a declared field nobody writes, or a written one left undeclared, fails."""
    import torch

    from megatron_rl.algorithms.grpo import STAT_KEYS, stats_from_sums

    timer = PhaseTimer()
    for p in PHASES:
        with timer.phase(p):
            pass
    produced = {**reward_stats([0.0, 1.0], group_size=2), **length_stats([1, 2], max_new_tokens=2),
                **stats_from_sums(torch.zeros(len(STAT_KEYS), dtype=torch.float64), mismatch_max=0.0),
                **timer.step_metrics()}
    by_trainer = {"step", "grad_norm", "lr"}  # MetricsLogger.log's step, train_step's own two
    assert set(produced) == set(STEP_FIELDS) - by_trainer, (set(produced) ^ (set(STEP_FIELDS) - by_trainer))
    assert len(set(STEP_FIELDS)) == len(STEP_FIELDS)


def test_nested_phase_is_timed_on_its_own():
    """The KL reference's "ref" phase runs inside "train": its seconds are not counted twice."""
    timer = PhaseTimer()
    with timer.phase("train"):
        time.sleep(0.03)
        with timer.phase("ref"):
            time.sleep(0.06)
        time.sleep(0.03)
    m = timer.step_metrics()
    assert 0.06 <= m["time/ref_s"] < 2.0
    assert 0.06 <= m["time/train_s"] < m["time/ref_s"] + 0.06, m  # ~0.06 s, the ref's 0.06 s excluded
    assert m["time/step_s"] >= m["time/train_s"] + m["time/ref_s"]
    assert "mem/ref_mib" in m and "mem/train_mib" in m
    assert [line.split()[0] for line in phase_table(m).splitlines()[1:]] == ["ref", "train", "step"]
    assert "time/ref_s" not in STEP_FIELDS  # optional: only runs with algorithm.kl_coef > 0


def test_progress_bar_final_line_printed_once():
    """The last step's bar line appears once, even when lines are printed after it and the bar
    was due for a redraw (before the fix: 3 copies, from the update, each later print, close)."""
    out = io.StringIO()
    log = MetricsLogger("unused", rank=0, total_steps=3, jsonl=False, stream=out)
    log.log(0, {"reward/mean": 0.1})
    log.log(1, {"reward/mean": 0.2})
    time.sleep(0.55)  # past the bar's mininterval (0.5 s): an update would redraw now
    log.log(2, {"reward/mean": 0.3})
    log.print("step 2: phase table")
    log.print("mean reward per step: ...")
    log.close()
    text = out.getvalue()
    assert text.count("3/3") == 1, repr(text)
    assert text.endswith("step 2: phase table\nmean reward per step: ...\n"), repr(text)  # plain lines after it
