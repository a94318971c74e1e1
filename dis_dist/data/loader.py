"""An endless, deterministic, rank-sharded batch iterator whose position can be saved and restored."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from dis_dist.data.base import ImageDataset
from dis_dist.errors import DataError
from dis_dist.utils.seeding import mix_seed

log = logging.getLogger(__name__)


class BatchLoader:
    """Batches of ``batch_size`` from a fresh permutation each epoch, dealt to the ranks in turn:
    rank r's i-th batch is the permutation's (i * world_size + r)-th run of ``batch_size``.

    Everything random is a pure function of (seed, epoch, batch index), so the state is just the
    position, counted in samples: a resumed run sees exactly the batches the uninterrupted run
    would, and the samples of each global step do not depend on how many ranks share it.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        random_flip: bool = False,
    ) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.random_flip = random_flip
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the dataset has {len(dataset)} samples: fewer than one micro-batch of "
                f"{batch_size} per rank over {world_size} rank(s)"
            )
        self.epoch, self.index = 0, 0
        self._order: Tensor | None = None
        self.channels, self.image_size = dataset.channels, dataset.image_size
        self.class_names = dataset.class_names
        self.shard_errors = 0  # the streaming loader's counter; an in-memory dataset has none
        self.vae, self.scaling_factor = "pixels", 1.0  # what decodes a sample for display

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _generator(self, *key: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, *key))

    def _epoch_order(self) -> Tensor:
        if self._order is None:
            self._order = torch.randperm(len(self.dataset), generator=self._generator(self.epoch))
        return self._order

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        chunk = self.index * self.world_size + self.rank
        indices = self._epoch_order()[chunk * self.batch_size : (chunk + 1) * self.batch_size]
        x, y = self.dataset.batch(indices)
        if self.random_flip:
            g = self._generator(self.epoch, chunk, 1)
            flip = torch.rand(len(indices), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        self.index += 1
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples": self.index * self.batch_size * self.world_size,
                "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        per_batch = self.batch_size * self.world_size
        if state["samples"] % per_batch or state.get("seed") != self.seed:
            log.warning("resumed with another seed, or a position (%d samples into the epoch) that is "
                        "not a whole number of micro-batch x ranks = %d: the sample order differs from "
                        "the uninterrupted run's", state["samples"], per_batch)
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["samples"]) // per_batch, None
