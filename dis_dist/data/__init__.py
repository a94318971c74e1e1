"""Image sources and the streaming loader the trainer reads from."""

from __future__ import annotations

from dis_dist.config import DataConfig
from dis_dist.data.base import ImageDataset
from dis_dist.data.fmnist import load_fmnist
from dis_dist.data.loader import BatchLoader


def build_dataset(cfg: DataConfig) -> ImageDataset:
    """The dataset named by ``data.source``."""
    if cfg.source == "fmnist":
        return load_fmnist(cfg.root, cfg.split, cfg.image_size)
    raise AssertionError(f"unhandled data.source {cfg.source!r}")  # config validation lists sources


__all__ = ["BatchLoader", "ImageDataset", "build_dataset", "load_fmnist"]
