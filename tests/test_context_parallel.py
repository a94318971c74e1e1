"""Context parallelism: the bidirectional scan and the conv halo, then whole DiS models, with each
sequence split over 2 and 4 gloo ranks equal the unsplit computation, outputs and every gradient
(tests/cp_run.py). Training and resuming with it: tests/test_distributed.py."""

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


def _case(length: int, dtype: str, d_inner: int = 64, backend: str = "reference", batch: int = 2) -> dict:
    return {"length": length, "d_inner": d_inner, "d_state": 16, "batch": batch, "dtype": dtype, "backend": backend}


@pytest.mark.parametrize("nproc", [2, 4])
def test_split_scan_equals_the_unsplit_one(tmp_path: Path, nproc: int) -> None:
    # 258 = 2 prefix tokens + 16 x 16 patches: uneven over 4 ranks; 7 over 4 ranks: slices of 1-2
    # tokens would be shorter than the conv halo, so the shortest case is 13 (slices of 3-4).
    cases = [_case(258, "float64"), _case(13, "float64"), _case(258, "float32"),
             _case(258, "float64", backend="chunked"), _case(258, "float32", backend="chunked"),
             _case(1026, "float64", d_inner=736, backend="chunked"), _case(4098, "float64", backend="chunked"),
             # Under Triton's interpreter on CPU, whose time goes with the programs (batch x d_inner / 8):
             # one sample, two blocks of d (the zero-start scans and last states the split takes from
             # the kernel; several samples: the other cases, and tests/test_scan_backends.py).
             _case(37, "float32", d_inner=16, backend="triton_tiled", batch=1)]
    errors = _run(tmp_path, nproc, cases)
    tolerance = {"float64": 1e-10, "float32": 1e-5}
    for case, error in zip(cases, errors):
        assert error < tolerance[case["dtype"]], (case, error)


TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
# (width, depth): DiS-T, and DiS-S's width at depth 4; input sizes 32, 64 and 128 latents at patch
# 2 are L = 258, 1026 and 4098 tokens (2 prefix tokens): uneven over 4 ranks.
TINY, SMALL = (128, 4), (368, 4)
# The long sequences at depth 2: two split blocks, the second's gradients flowing back through the
# first's split scan and halos, at half the cost of 4 (depth 4: test_split_model_equals_the_unsplit_one).
LONG_TINY, LONG_SMALL = (128, 2), (368, 2)
LENGTH_TO_INPUT = {258: 32, 1026: 64, 4098: 128}


def _model_case(shape: tuple[int, int], length: int, dtype: str, backend: str, checkpointing: bool = False,
                batch: int = 2) -> dict:
    width, depth = shape
    return {"model": {"width": width, "depth": depth, "input_size": LENGTH_TO_INPUT[length]},
            "batch": batch, "dtype": dtype, "backend": backend, "checkpointing": checkpointing, "splits": [2, 4]}


def _check(tmp_path: Path, cases: list[dict]) -> None:
    """Each case split over 2 and over 4 of 4 ranks, against one unsplit run (on rank 3, while
    ranks 0 and 1 run the split over 2)."""
    for case, errors in zip(cases, _run(tmp_path, 4, cases)):
        for k, error in errors.items():
            print(f"{k} ranks {case}: max relative error {error:.2e}")
            assert error < TOLERANCE[case["dtype"]], (k, case, error)
        assert sorted(map(int, errors)) == case["splits"]


def test_split_model_equals_the_unsplit_one(tmp_path: Path) -> None:
    """DiS-T at L = 258 (label dropout and drop path on), with activation checkpointing too."""
    _check(tmp_path, [_model_case(TINY, 258, "float64", "reference"),
                      _model_case(TINY, 258, "float32", "reference", checkpointing=True)])


@pytest.mark.slow
def test_split_long_sequences_equal_the_unsplit_model(tmp_path: Path) -> None:
    """DiS-T and DiS-S-shaped models (their widths, 2 blocks) at L = 1026 and 4098 (and DiS-S at
    258), fp64 and fp32, one sample each (several samples split alike, and 4 blocks:
    test_split_model_equals_the_unsplit_one)."""
    _check(tmp_path, [
        _model_case(LONG_SMALL, 258, "float32", "chunked", batch=1),
        _model_case(LONG_TINY, 1026, "float64", "chunked", batch=1),
        _model_case(LONG_SMALL, 1026, "float32", "chunked", batch=1),
        _model_case(LONG_SMALL, 1026, "float64", "chunked", checkpointing=True, batch=1),
        _model_case(LONG_TINY, 4098, "float32", "chunked", checkpointing=True, batch=1),
        _model_case(LONG_SMALL, 4098, "float64", "chunked", batch=1),
    ])
