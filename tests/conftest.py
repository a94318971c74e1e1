"""Shared test helpers.

Under CI=true a test never skips for missing infrastructure (dataset, S3 server, SLURM,
DeepSpeed): ``require`` fails it instead, so a green CI run means everything really ran.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The scan backend is auto (the native cpu kernel, built once into $TORCH_EXTENSIONS_DIR); tests
# that name the chunked backend run it eagerly (same results, no compile per test shape), and
# tests of its compiled path set this themselves.
os.environ.setdefault("DIS_SCAN_COMPILE", "0")
# Cached reference statistics of evaluations go to a directory of this session, not ~/.cache,
# removed when the session ends (the test subprocesses inherit it).
if "DIS_DIST_CACHE" not in os.environ:
    os.environ["DIS_DIST_CACHE"] = tempfile.mkdtemp(prefix="dis_dist_test_cache_")
    atexit.register(shutil.rmtree, os.environ["DIS_DIST_CACHE"], ignore_errors=True)
# Without a GPU the triton backend is tested under Triton's interpreter; it must be set before
# the kernels are defined (at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


def require(condition: bool, what: str) -> None:
    """Skip (locally) or fail (under CI=true) when infrastructure the test needs is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing infrastructure under CI=true: {what}")
    pytest.skip(f"missing infrastructure: {what}")


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    require(
        (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(),
        "Fashion-MNIST (apt-get install dataset-fashion-mnist)",
    )
    return FMNIST_ROOT


@pytest.fixture(scope="session")
def classifier(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> Path:
    """A Fashion-MNIST classifier trained briefly (8,000 images, one epoch, ~10 s): enough to
    tell the classes apart."""
    from dis_dist.eval.classifier import train_classifier

    path = tmp_path_factory.mktemp("classifier") / "fmnist_classifier.pt"
    accuracy = train_classifier(path, fmnist_root, epochs=1, limit=8000)
    assert accuracy > 0.75, accuracy
    return path


@pytest.fixture(scope="session")
def fmnist_reference(tmp_path_factory: pytest.TempPathFactory, classifier: Path, fmnist_root: Path) -> Path:
    """Reference statistics (a statistics .npz, with the features precision/recall needs) of the
    first 1,000 images of Fashion-MNIST's test split in the classifier's features: the
    ``eval.reference`` of tests whose subject is not the reference. Against the whole split's
    10,000, every evaluation's k-NN radii of the reference cost a hundred times more."""
    from dis_dist.eval.features import ReferenceStats, build_extractor, extract
    from dis_dist.eval.images import open_images

    path = tmp_path_factory.mktemp("fmnist_reference") / "fmnist_test_1000.npz"
    extractor = build_extractor("fmnist", str(classifier))
    ReferenceStats.of(extract(extractor, open_images(str(fmnist_root), resolution=32, limit=1000),
                              progress=False)).save(path)
    return path


@pytest.fixture(scope="session")
def fmnist_cache(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> Path:
    """Fashion-MNIST's test split as a pixel-space latent cache: 20 shards of 500, flip
    variants stored (a few seconds to encode)."""
    from dis_dist.data.encode import encode, parse_args

    out = tmp_path_factory.mktemp("fmnist_cache") / "pixels32"
    encode(parse_args(["--no-progress", "--input", str(fmnist_root), "--output", str(out), "--vae", "pixels",
                       "--split", "test", "--resolution", "32", "--shard-size", "500"]))
    return out


def write_small_cache(root: Path, *, shards: int = 4, per_shard: int = 6, channels: int = 2, size: int = 8,
                      classes: int = 3) -> Path:
    """A latent cache written directly (no encoder): random float16 latents with flip variants."""
    from tests.fixtures import write_random_cache

    return write_random_cache(root, shards=shards, per_shard=per_shard, channels=channels, size=size,
                              classes=classes)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
