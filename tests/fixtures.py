"""Data for tests and benchmarks whose subject is not the data: a latent cache of random latents,
written directly, without the encoder. ``tools/bench_scale.py`` uses it too."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from dis_dist.data.encoders import arrays_to_tensor
from dis_dist.data.manifest import FORMAT_VERSION, MANIFEST, CacheInfo, Manifest, ShardInfo, shard_name
from dis_dist.data.tar import build_shard


def write_random_cache(root: str | Path, *, shards: int, per_shard: int, channels: int, size: int,
                       classes: int, seed: int = 0) -> Path:
    """Write a latent cache of random float16 latents (with flip variants) at ``root``: pixel-space
    ``sample`` latents, classes named c0, c1, ..., and its manifest. Return ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(shards):
        samples = [{"key": f"s{i}_{k:03d}", "cls": int(rng.integers(classes)),
                    "latent": rng.standard_normal((channels, size, size)).astype(np.float16),
                    "latent_flip": rng.standard_normal((channels, size, size)).astype(np.float16)}
                   for k in range(per_shard)]
        data = build_shard(samples)
        (root / shard_name(i)).write_bytes(data)
        entries.append(ShardInfo(name=shard_name(i), samples=per_shard, bytes=len(data),
                                 sha256=hashlib.sha256(data).hexdigest()))
    info = CacheInfo(vae="pixels", vae_revision=None, scaling_factor=1.0, resolution=size,
                     latent_shape=[channels, size, size], latent_dtype="float16", latent_kind="sample",
                     class_names=[f"c{c}" for c in range(classes)], has_flip=True, num_shards=shards, encode={})
    manifest = Manifest(format_version=FORMAT_VERSION, info=info, total_samples=shards * per_shard,
                        shards=entries, skipped=[])
    # Compact JSON, not Manifest.to_json's indented form: the bytes these caches have always had.
    (root / MANIFEST).write_text(json.dumps(dataclasses.asdict(manifest)))
    return root


def to_tensor(images: list) -> torch.Tensor:
    """uint8 PIL images (all one size and mode) -> float (n, C, H, W) in [-1, 1]: the encode's
    path through PIL, which its array path must equal."""
    return arrays_to_tensor(np.stack([np.asarray(im) for im in images]))
