"""Image sources, the latent-cache format, and the loaders the trainer reads from."""

from __future__ import annotations

from typing import Protocol

import torch

from dis_dist.config import DataConfig
from dis_dist.data.base import ImageDataset
from dis_dist.data.fmnist import load_fmnist
from dis_dist.data.loader import BatchLoader
from dis_dist.errors import ConfigError


class TrainLoader(Protocol):
    """What the trainer needs of its data: endless (x, labels) batches with a resumable position."""

    channels: int
    image_size: int
    class_names: tuple[str, ...]
    shard_errors: int
    vae: str  # "pixels", or the VAE that decodes these latents for display
    scaling_factor: float

    @property
    def num_classes(self) -> int: ...

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_loader(cfg: DataConfig, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The loader for ``data.source``: Fashion-MNIST in memory, or a latent cache's shards."""
    if cfg.source == "fmnist":
        dataset = load_fmnist(cfg.root, cfg.split, cfg.image_size)
        return BatchLoader(dataset, batch_size, seed=seed, rank=rank, world_size=world_size,
                           random_flip=cfg.random_flip)
    from dis_dist.data.stream import StreamLoader, StreamSpec

    options = {"endpoint_url": cfg.s3_endpoint} if cfg.s3_endpoint else {}
    loader = StreamLoader(StreamSpec(
        url=cfg.url, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
        num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, random_flip=cfg.random_flip,
        on_error=cfg.on_error, verify=cfg.verify, cache_dir=cfg.cache_dir or None, options=options,
    ))
    if loader.image_size != cfg.image_size:
        raise ConfigError(
            f"data.image_size={cfg.image_size}, but the cache at {cfg.url!r} holds "
            f"{loader.image_size}x{loader.image_size} latents: set data.image_size={loader.image_size}"
        )
    return loader


__all__ = ["BatchLoader", "ImageDataset", "TrainLoader", "build_loader", "load_fmnist"]
