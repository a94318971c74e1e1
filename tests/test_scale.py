"""tools/bench_scale.py's path with DiS-B/2 on 2 CPU ranks, FSDP and ZeRO-3: meta-device init, steps
with activation checkpointing and 2 DataLoader workers, a checkpoint, a resume, an export and a
guided grid; each rank's peak resident memory within 15% of the planner's figure."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_dis_b2_end_to_end_on_two_ranks_fits_the_planner(tmp_path: Path, strategy: str) -> None:
    if strategy == "zero3":
        require(importlib.util.find_spec("deepspeed") is not None, "DeepSpeed (pip install deepspeed)")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_scale.py"), "--model", "DiS-B/2", "--strategies", strategy,
         "--steps", "2", "--grid", "4", "--grid-batch", "2", "--out", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    (row,) = json.loads((tmp_path / "results.json").read_text())
    for rank in row["train"]:
        assert rank["step"] == 2
        assert rank["peak_gb"]["train"] == pytest.approx(row["planned_gb"], rel=0.15), rank
    assert [rank["step"] for rank in row["resume"]] == [3, 3]  # resumed at 2, one more step
    run = tmp_path / strategy
    assert (run / "samples.png").is_file()
    assert not (run / "checkpoints").exists() and not (run / "export").exists()  # measured, then deleted
    params = 121_163_552
    # The checkpoint holds weights (ZeRO-3: the master partitions), EMA and Adam's two moments:
    # 16 bytes per parameter.
    assert row["ckpt_gb"] == pytest.approx(16 * params / 1e9, rel=0.05)
    assert row["export"]["bytes"] == pytest.approx(4 * params, rel=0.01)
