"""Feature networks behind the metrics, and the statistics of a set of images in their space
(cached for reference sets, which are computed once and compared against many times).

``inception``: the TF-FID Inception-v3 (FID, sFID, IS, precision/recall), the standard.
``fmnist``: our Fashion-MNIST classifier (Frechet distance in its feature space, conditional
accuracy, precision/recall), for the demo and wherever the Inception weights are not at hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch import nn

from dis_dist.errors import ConfigError, DataError
from dis_dist.eval.images import ImageSet
from dis_dist.eval.metrics import Gaussian
from dis_dist.utils.npz import npz_header, npz_keys

log = logging.getLogger(__name__)
FEATURE_KINDS = ("inception", "fmnist")
CACHE_ENV = "DIS_DIST_CACHE"


def default_cache_dir() -> Path:
    """$DIS_DIST_CACHE/eval, else ~/.cache/dis_dist/eval."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dis_dist"
    return Path(root) / "eval"


class Extractor:
    """A feature network: uint8 (n, H, W, C) images -> ``pool`` features, ``logits``, and for
    Inception the ``spatial`` features of sFID. ``id`` names the network and its weights (it
    keys the cache of reference statistics)."""

    def __init__(self, kind: str, net: nn.Module, weights: Path | None, device: torch.device) -> None:
        self.kind, self.net, self.device = kind, net, device
        tag = hashlib.sha1(weights.read_bytes()).hexdigest()[:12] if weights is not None else "random"
        self.id = f"{kind}:{tag}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        if isinstance(images, np.ndarray) and not images.flags.writeable:  # read straight from a file
            images = images.copy()
        out = self.net(torch.as_tensor(images).to(self.device))
        return {k: v.float().cpu().numpy() for k, v in out.items()}


def build_extractor(kind: str, weights: str | None = None, device: torch.device | str = "cpu") -> Extractor:
    """``kind`` inception (weights: pytorch-fid's file; see inception.find_weights) or fmnist
    (weights: the classifier file, default .cache/fmnist_classifier.pt)."""
    device = torch.device(device)
    if kind == "inception":
        from dis_dist.eval.inception import find_weights, load_inception

        path = find_weights(weights)
        return Extractor(kind, load_inception(path, device), path, device)
    if kind == "fmnist":
        from dis_dist.eval.classifier import DEFAULT_PATH, load_classifier

        path = Path(weights or DEFAULT_PATH)
        return Extractor(kind, load_classifier(path, device), path, device)
    raise ConfigError(f"unknown feature network {kind!r}; choose one of: {', '.join(FEATURE_KINDS)}")


def extract(
    extractor: Extractor, images: ImageSet, batch_size: int = 100, progress: bool = True
) -> dict[str, np.ndarray]:
    """Every feature of every image, concatenated (``pool`` etc. as (n, dim) float32)."""
    from tqdm import tqdm

    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=images.count, desc="features", unit="img", disable=not progress or None) as bar:
        for batch in images.batches(batch_size):
            for key, value in extractor(batch).items():
                parts.setdefault(key, []).append(value)
            bar.update(len(batch))
    count = sum(len(v) for v in parts.get("pool", []))
    if count < 2:
        raise DataError(f"{images.description}: {count} image{'' if count == 1 else 's'}; the metrics need at least 2")
    return {k: np.concatenate(v) for k, v in parts.items()}


@dataclass
class ReferenceStats:
    """What the metrics need of a reference set: Gaussians of ``pool`` (and ``spatial``)
    features, and the ``pool`` features themselves for precision/recall (None when the
    reference came as statistics only). Saved with ADM's key names (mu, sigma, mu_s, sigma_s).
    ``source``: the file or images they come from, for messages."""

    pool: Gaussian
    spatial: Gaussian | None
    pool_features: np.ndarray | None
    count: int
    source: str = ""

    @classmethod
    def of(cls, features: dict[str, np.ndarray]) -> ReferenceStats:
        spatial = Gaussian.of(features["spatial"]) if "spatial" in features else None
        return cls(Gaussian.of(features["pool"]), spatial, features["pool"], len(features["pool"]))

    def save(self, path: Path) -> None:
        """Write the statistics to ``path``, only once they read back as :meth:`load` checks them:
        a cache holds nothing unchecked."""
        arrays = {"mu": self.pool.mu, "sigma": self.pool.sigma, "count": np.asarray(self.count)}
        if self.spatial is not None:
            arrays |= {"mu_s": self.spatial.mu, "sigma_s": self.spatial.sigma}
        if self.pool_features is not None:
            arrays["pool"] = self.pool_features.astype(np.float16)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        try:
            ReferenceStats.load(tmp)
        except DataError as e:
            tmp.unlink()
            raise DataError(f"the statistics of {self.source or 'the reference'} are not usable: {e}") from None
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """Statistics saved by :meth:`save` (or ADM's mu/sigma files), checked: finite numbers,
        mu (d,) with sigma (d, d), pool features (n, d); DataError naming the file and key."""
        keys = set(npz_keys(path))

        def fail(what: str) -> NoReturn:
            raise DataError(f"{str(path)!r} are not usable statistics: {what} (compute them again from "
                            f"the reference's images)")

        arrays: dict[str, np.ndarray] = {}
        for key in sorted(keys & {"mu", "sigma", "mu_s", "sigma_s", "pool", "count"}):
            shape, dtype = npz_header(path, key)
            if dtype.kind not in "fiu":
                fail(f"{key} is {dtype} of shape {shape}, not numbers")
            with np.load(path) as z:
                arrays[key] = z[key].astype(np.float64 if key != "pool" else np.float32)
            if not np.isfinite(arrays[key]).all():
                fail(f"{key} holds values that are not finite (NaN or inf)")

        def gaussian(mu_key: str, sigma_key: str) -> Gaussian:
            if sigma_key not in arrays or mu_key not in arrays:
                fail(f"{mu_key} and {sigma_key} come together; it holds {', '.join(sorted(keys)) or 'nothing'}")
            mu, sigma = arrays[mu_key], arrays[sigma_key]
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                fail(f"{mu_key} has shape {mu.shape} and {sigma_key} {sigma.shape}: expected (d,) and (d, d)")
            return Gaussian(mu, sigma)

        pool_gaussian = gaussian("mu", "sigma")
        spatial = gaussian("mu_s", "sigma_s") if keys & {"mu_s", "sigma_s"} else None
        pool = arrays.get("pool")
        if pool is not None and (pool.ndim != 2 or pool.shape[1] != len(pool_gaussian.mu) or len(pool) < 2):
            fail(f"pool has shape {pool.shape}: expected (n >= 2, {len(pool_gaussian.mu)}) features like mu's")
        count = len(pool) if pool is not None else 0
        if "count" in arrays:
            if arrays["count"].shape != ():
                fail(f"count has shape {arrays['count'].shape}, not a number")
            count = int(arrays["count"])
        return cls(pool_gaussian, spatial, pool, count, str(path))


def _cache_key(url: str, extractor: Extractor, resolution: int | None, limit: int | None) -> str:
    path = Path(url)
    stamp = f"{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() else ""
    text = f"{path.resolve() if path.exists() else url}|{stamp}|{extractor.id}|{resolution}|{limit}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def reference_stats(
    url: str, extractor: Extractor, *, resolution: int | None = None, limit: int | None = None,
    cache_dir: str | Path | None = None, batch_size: int = 100, progress: bool = True,
) -> ReferenceStats:
    """Statistics of the reference at ``url``: a statistics ``.npz`` as is (it must come from
    the same feature network), else computed from its images once and cached in ``cache_dir``
    (default: :func:`default_cache_dir`), keyed by the file, the network and the settings."""
    from dis_dist.data.inputs import url_kind
    from dis_dist.eval.images import open_images

    kind = url_kind(url)
    if kind == "statistics":
        return ReferenceStats.load(url)
    key = _cache_key(url, extractor, resolution, limit)
    cache = Path(cache_dir or default_cache_dir()) / f"ref-{extractor.kind}-{key}.npz"
    if cache.is_file():
        log.info("reference statistics of %s from the cache %s", url, cache)
        return ReferenceStats.load(cache)
    images = open_images(url, resolution=resolution, limit=limit, kind=kind)
    log.info("computing reference statistics of %s with %s", images.description, extractor.id)
    stats = ReferenceStats.of(extract(extractor, images, batch_size, progress))
    stats.source = images.description
    stats.save(cache)
    log.info("cached them in %s", cache)
    return stats
