"""Context parallelism: the bidirectional scan and the conv halo with each sequence split over
2 and 4 gloo ranks equal the unsplit computation, outputs and every gradient (tests/cp_run.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, nproc: int, cases: list[dict]) -> list[float]:
    from tests.test_distributed import _free_port

    spec = tmp_path / "spec.json"
    out = tmp_path / "errors.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           str(ROOT / "tests" / "cp_run.py"), str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _case(length: int, dtype: str, d_inner: int = 64, backend: str = "reference") -> dict:
    return {"length": length, "d_inner": d_inner, "d_state": 16, "batch": 2, "dtype": dtype, "backend": backend}


@pytest.mark.parametrize("nproc", [2, 4])
def test_split_scan_equals_the_unsplit_one(tmp_path: Path, nproc: int) -> None:
    # 258 = 2 prefix tokens + 16 x 16 patches: uneven over 4 ranks; 7 over 4 ranks: slices of 1-2
    # tokens would be shorter than the conv halo, so the shortest case is 13 (slices of 3-4).
    cases = [_case(258, "float64"), _case(13, "float64"), _case(258, "float32"),
             _case(258, "float64", backend="chunked"), _case(258, "float32", backend="chunked"),
             _case(1026, "float64", d_inner=736, backend="chunked"), _case(4098, "float64", backend="chunked")]
    errors = _run(tmp_path, nproc, cases)
    tolerance = {"float64": 1e-10, "float32": 1e-5}
    for case, error in zip(cases, errors):
        assert error < tolerance[case["dtype"]], (case, error)
