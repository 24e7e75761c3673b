"""Tier 1: ``megatron-rl plot`` writes a valid PNG from a metrics.jsonl written here.

The PNG is checked with a reader written in this file from the PNG specification (not with
matplotlib's or Pillow's): the signature, every chunk's CRC, the IHDR's size, IDAT data that
inflates to exactly height x (1 + width x bytes per pixel) bytes with a valid filter byte on
every scanline, and pixels that are not one flat colour. Negative controls: the reader rejects a
corrupted file and a truncated one; an empty metrics file and a missing matplotlib each give one
line and no PNG.
"""
import json
import math
import struct
import zlib

import pytest

from megatron_rl import cli, plot

pytestmark = pytest.mark.unit
SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel (PNG spec, 11.2.2)


def read_png(data: bytes) -> dict:
    """Parse a PNG: returns its width, height and the inflated scanlines; raises on any defect."""
    assert data[:8] == SIGNATURE, "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body, crc = data[pos + 8:pos + 8 + length], data[pos + 8 + length:pos + 12 + length]
        assert len(body) == length and len(crc) == 4, f"chunk {kind!r} truncated"
        assert zlib.crc32(kind + body) == struct.unpack(">I", crc)[0], f"chunk {kind!r}: bad CRC"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", [k for k, _ in chunks]
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and interlace == 0, (depth, interlace)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    stride = 1 + width * CHANNELS[colour]
    assert len(raw) == height * stride, (len(raw), height, stride)
    rows = [raw[i * stride:(i + 1) * stride] for i in range(height)]
    assert all(r[0] <= 4 for r in rows), "a scanline has an invalid filter type"
    return {"width": width, "height": height, "rows": rows}


def _rows(steps: int) -> list:
    out = []
    for s in range(steps):
        row = {"step": s, "reward/mean": 0.1 + 0.8 * s / steps, "reward/min": 0.0, "reward/max": 1.0,
               "loss": math.cos(s) * 0.1, "kl": 0.0, "mismatch/abs_mean": 1e-7 * (1 + s), "mismatch/abs_max": 1e-6,
               "time/rollout_s": 1.0, "time/release_s": 0.1, "time/train_s": 2.0, "time/sync_s": 0.3,
               "time/resume_s": 0.2, "time/step_s": 3.8}
        if s % 4 == 0:
            row.update({"eval/pass@1": s / steps, "eval/reward_mean": 0.5})
        out.append(row)
    out[3]["loss"] = None  # the logger writes NaN as null: it must be skipped, not drawn
    return out


def _write_run(tmp_path, rows) -> str:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(run)


def test_plot_command_writes_a_valid_png(tmp_path, capsys):
    run = _write_run(tmp_path, _rows(12))
    assert cli.main(["plot", run]) == 0
    path = f"{run}/metrics.png"
    assert capsys.readouterr().out.strip() == path
    png = read_png(open(path, "rb").read())
    assert png["width"] >= 300 and png["height"] >= 400, png["width"]  # four stacked panels: taller than wide
    assert png["height"] > png["width"]
    assert len({bytes(r[1:]) for r in png["rows"]}) > 50  # drawn, not one flat colour

    # Negative controls for the reader: one flipped byte inside IDAT, and a cut-off file.
    data = bytearray(open(path, "rb").read())
    at = data.index(b"IDAT") + 20
    data[at] ^= 0xFF
    with pytest.raises(AssertionError, match="bad CRC"):
        read_png(bytes(data))
    with pytest.raises(AssertionError, match="truncated"):
        read_png(open(path, "rb").read()[:-100])
    with pytest.raises(AssertionError, match="signature"):
        read_png(b"GIF89a" + bytes(100))


def test_plot_end_of_run_and_nothing_to_plot(tmp_path, monkeypatch, capsys):
    run = _write_run(tmp_path, _rows(5))
    out = str(tmp_path / "x.png")
    assert plot.plot_run(run, out=out) == out and read_png(open(out, "rb").read())["width"] > 0
    assert plot.end_of_run(run) == f"plot: {run}/metrics.png"

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert cli.main(["plot", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metric rows" in err[0] and "fix:" in err[0], err
    assert not (empty / "metrics.png").exists()
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err

    # Without matplotlib: the run's last line says so and how to fix it; no file, no exception.
    real = plot.importlib.util.find_spec
    monkeypatch.setattr(plot.importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    (tmp_path / "run" / "metrics.png").unlink()
    line = plot.end_of_run(run)
    assert line.startswith("plot: not written: matplotlib is not installed; fix: pip install"), line
    assert f"megatron-rl plot {run}" in line and "\n" not in line
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_plot_series_skip_missing_and_non_finite_values():
    rows = _rows(8)
    s = plot.series(rows, "loss")
    assert s.steps == [0, 1, 2, 4, 5, 6, 7] and s.values[0] == pytest.approx(0.1)
    assert plot.series(rows, "eval/pass@1").steps == [0, 4]
    assert plot.eval_keys(rows) == ["eval/pass@1", "eval/reward_mean"]
    assert plot.phase_keys(rows) == ["time/rollout_s", "time/release_s", "time/train_s", "time/sync_s",
                                     "time/resume_s"]
