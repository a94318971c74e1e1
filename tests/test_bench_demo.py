"""tools/bench_demo.py: the demo's step in each of its settings, timed in one process."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_demo_times_every_setting_against_the_first(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_demo", ROOT / "tools" / "bench_demo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--rounds", "1", "--steps", "1", "--warmup", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("32x32", "28x28"))]
    assert [row[:40].strip() for row in rows] == [name for name, *_ in bench.SETTINGS]
    assert " 1.00x " in rows[0]
    for row in rows:
        ms, images_per_s = (float(v) for v in row[40:].split()[:2])
        assert ms > 0 and images_per_s == pytest.approx(64 / ms * 1e3, rel=0.01, abs=0.06)  # printed to 0.1
