"""tools/fid.py as a hostile user would call it (issue 26, item 6): images that are not uint8,
too few samples, labels out of range or too few, object arrays, files that are not .npz,
statistics that are not finite or of the wrong shape. Each is refused with one line naming the
file, the key and what is wrong (exit status 2), never scored, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dis_dist.eval.classifier import FEATURES, FmnistClassifier
from dis_dist.eval.fid import main as fid_main

N = 12  # samples in a good set


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained Fashion-MNIST classifier: the checks come before any score matters."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    torch.save({"model": FmnistClassifier().state_dict()}, path)
    return path


def _images(n: int = N) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _labels(n: int = N) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 10


def _stats(dim: int = FEATURES, n: int = 20) -> dict[str, np.ndarray]:
    pool = np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)
    return {"mu": pool.mean(0), "sigma": np.cov(pool, rowvar=False), "pool": pool, "count": np.asarray(n)}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fid")
    np.savez(root / "samples.npz", arr_0=_images(), arr_1=_labels())
    np.savez(root / "stats.npz", **_stats())
    np.savez(root / "reference.npz", arr_0=_images(20))
    return root


def _fid(classifier: Path, samples: Path, reference: Path, capsys: pytest.CaptureFixture[str],
         *extra: str) -> tuple[int, str, str]:
    rc = fid_main([str(samples), str(reference), "--features", "fmnist", "--weights", str(classifier),
                   "--cache-dir", str(samples.parent / "cache"), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_good_inputs_are_scored(tmp_path: Path, classifier: Path, files: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    for reference in ("stats.npz", "reference.npz"):
        rc, out, err = _fid(classifier, files / "samples.npz", files / reference, capsys,
                            "--json", str(tmp_path / "m.json"))
        assert rc == 0, err
        metrics = json.loads((tmp_path / "m.json").read_text())
        assert {"fd", "accuracy", "precision", "recall"} <= set(metrics)
        assert all(np.isfinite(metrics[k]) for k in ("fd", "accuracy", "precision", "recall"))


# -- the samples ----------------------------------------------------------------------------

def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.savez(path, **arrays)


def _object_images(path: Path) -> None:
    images = np.empty(N, dtype=object)
    images[:] = list(_images())
    np.savez(path, arr_0=images, arr_1=_labels())


def _object_labels(path: Path) -> None:
    np.savez(path, arr_0=_images(), arr_1=np.array([str(i) for i in range(N)], dtype=object))


SAMPLE_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...], tuple[str, ...]]] = {
    # case: (write the samples file, extra arguments, what the message names)
    "float images in [0, 1]": (_npz(arr_0=_images().astype(np.float32) / 255, arr_1=_labels()), (),
                               ("arr_0", "float32", "uint8")),
    "NaN images": (_npz(arr_0=np.full((N, 32, 32, 3), np.nan, np.float32), arr_1=_labels()), (), ("arr_0", "uint8")),
    "object images": (_object_images, (), ("arr_0", "object")),
    "0 samples": (_npz(arr_0=_images(0), arr_1=_labels(0)), (), ("0 images", "at least 2")),
    "1 sample": (_npz(arr_0=_images(1), arr_1=_labels(1)), (), ("1 image", "at least 2")),
    "--limit 1": (_npz(arr_0=_images(), arr_1=_labels()), ("--limit", "1"), ("1 image", "at least 2")),
    "3 samples with precision/recall": (_npz(arr_0=_images(3), arr_1=_labels(3)), (),
                                        ("3 images", "--no-precision-recall")),
    "images of 2 dimensions": (_npz(arr_0=_images()[..., 0].reshape(N, -1)), (), ("arr_0", "N x H x W x 3")),
    "label 99": (_npz(arr_0=_images(), arr_1=np.full(N, 99)), (), ("arr_1", "99", "[0, 10)")),
    "label -5": (_npz(arr_0=_images(), arr_1=np.full(N, -5)), (), ("arr_1", "-5", "[0, 10)")),
    "float labels": (_npz(arr_0=_images(), arr_1=_labels().astype(np.float64) + 0.5), (), ("arr_1", "float64")),
    "object labels": (_object_labels, (), ("arr_1", "object")),
    "too few labels": (_npz(arr_0=_images(), arr_1=_labels(3)), (), ("arr_1", "3 labels", f"{N} images")),
    "labels of 2 dimensions": (_npz(arr_0=_images(), arr_1=_labels().reshape(N, 1)), (), ("arr_1", "(12, 1)")),
    "not a zip": (lambda p: p.write_bytes(b"definitely not a zip file"), (), ("not an .npz",)),
    "truncated": (lambda p: (np.savez(p, arr_0=_images()), p.write_bytes(p.read_bytes()[:500])), (), ("not an .npz",)),
    "no arr_0": (_npz(images=_images()), (), ("arr_0",)),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_bad_samples_are_refused(tmp_path: Path, classifier: Path, files: Path,
                                 capsys: pytest.CaptureFixture[str], case: str) -> None:
    write, extra, named = SAMPLE_CASES[case]
    samples = tmp_path / "samples.npz"
    write(samples)
    rc, out, err = _fid(classifier, samples, files / "stats.npz", capsys, *extra)
    assert rc == 2, (out, err)
    assert err.startswith("error:") and "\n" not in err.strip(), err
    assert str(samples) in err and all(part in err for part in named), err
    assert "Frechet" not in out  # nothing scored


# -- the reference -------------------------------------------------------------------------------

def _stats_with(**changes: np.ndarray | None) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        stats = {**_stats(), **changes}
        np.savez(path, **{k: v for k, v in stats.items() if v is not None})

    return write


REFERENCE_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "NaN mu": (_stats_with(mu=np.full(FEATURES, np.nan)), ("mu", "not finite")),
    "inf sigma": (_stats_with(sigma=np.full((FEATURES, FEATURES), np.inf)), ("sigma", "not finite")),
    "sigma (256, 3)": (_stats_with(sigma=np.zeros((FEATURES, 3))), ("sigma", f"({FEATURES}, 3)")),
    "mu of 2 dimensions": (_stats_with(mu=np.zeros((FEATURES, 1))), ("mu", f"({FEATURES}, 1)")),
    "mu of another network": (_stats_with(mu=np.zeros(2048), sigma=np.eye(2048), pool=None),
                              ("2048", str(FEATURES))),
    "pool of another width": (_stats_with(pool=np.zeros((20, 3), np.float32)), ("pool", "(20, 3)")),
    "mu_s without sigma_s": (_stats_with(mu_s=np.zeros(7)), ("sigma_s",)),
    "object sigma": (_stats_with(sigma=np.array([None, 1], dtype=object)), ("sigma", "object")),
    "not a zip": (lambda p: p.write_bytes(b"\x80\x04not a pickle either"), ("not an .npz",)),
    "1 reference image": (_npz(arr_0=_images(1)), ("1 image", "at least 2")),
    "float reference images": (_npz(arr_0=_images(20).astype(np.float64)), ("arr_0", "float64", "uint8")),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_bad_references_are_refused(tmp_path: Path, classifier: Path, files: Path,
                                    capsys: pytest.CaptureFixture[str], case: str) -> None:
    write, named = REFERENCE_CASES[case]
    reference = tmp_path / "reference.npz"
    write(reference)
    rc, out, err = _fid(classifier, files / "samples.npz", reference, capsys)
    assert rc == 2, (out, err)
    assert err.startswith("error:") and "\n" not in err.strip(), err
    assert str(reference) in err and all(part in err for part in named), err
    assert "Frechet" not in out
