"""Shared test helpers.

Under CI=true a test never skips for missing infrastructure (dataset, S3 server, SLURM,
DeepSpeed): ``require`` fails it instead, so a green CI run means everything really ran.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Most tests run the chunked scan eagerly (same results, no compile per test shape);
# tests of the compiled path set it themselves.
os.environ.setdefault("DIS_SCAN_COMPILE", "0")
# Cached reference statistics of evaluations go to a directory of this session, not ~/.cache.
os.environ.setdefault("DIS_DIST_CACHE", tempfile.mkdtemp(prefix="dis_dist_test_cache_"))
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
    import hashlib
    import json

    import numpy as np

    from dis_dist.data.shards import MANIFEST, build_shard, shard_name

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(shards):
        samples = [{"key": f"s{i}_{k:03d}", "cls": int(rng.integers(classes)),
                    "latent": rng.standard_normal((channels, size, size)).astype(np.float16),
                    "latent_flip": rng.standard_normal((channels, size, size)).astype(np.float16)}
                   for k in range(per_shard)]
        data = build_shard(samples)
        (root / shard_name(i)).write_bytes(data)
        entries.append({"name": shard_name(i), "samples": per_shard, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "format_version": 1,
        "info": {"vae": "pixels", "vae_revision": None, "scaling_factor": 1.0, "resolution": size,
                 "latent_shape": [channels, size, size], "latent_dtype": "float16", "latent_kind": "sample",
                 "class_names": [f"c{c}" for c in range(classes)], "has_flip": True, "num_shards": shards,
                 "encode": {}},
        "total_samples": shards * per_shard, "shards": entries, "skipped": [],
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
