"""Streaming a latent cache into training: shards split over ranks and DataLoader workers,
shuffled, infinite, and exactly resumable.

Each epoch has its own shard order (from the run seed); rank r takes every world-th shard of
it, and worker w of that rank every num_workers-th of those. A worker reads each shard whole,
checks it against the manifest before using it, passes its samples through a shuffle buffer
(drained at the epoch's end, so epochs are independent) and yields whole batches, decoded with
randomness (flip variant, the draw from the moments) keyed by (seed, rank, stream, batch
number). The DataLoader hands batches out round-robin over its workers, so the number of
batches the trainer has taken fixes every stream's position: a resumed stream replays at most
one epoch of its shards, without decoding, to get back there.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dis_dist.data import fs
from dis_dist.data.manifest import Manifest, load_manifest
from dis_dist.data.shards import check_samples, load_shard, read_shard
from dis_dist.data.tar import npy_array
from dis_dist.errors import DataError
from dis_dist.utils.seeding import mix_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    url: str
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 1000
    random_flip: bool = True
    on_error: str = "skip"  # or "raise"
    verify: str = "size"  # check each shard against the manifest: "size" (and sample count), "sha256", "none"
    cache_dir: str | None = None  # local copies of remote shards
    options: dict[str, Any] = field(default_factory=dict)  # fsspec storage options


@dataclass(frozen=True)
class StreamFailure:
    """What a stream yields in place of a batch when it cannot go on (the loader raises it)."""

    message: str


class ShardStream(IterableDataset):
    """Yields (x float32 (B, C, H, W), labels (B,), shard errors seen by this worker so far)."""

    def __init__(self, manifest: Manifest, spec: StreamSpec, start_batches: int = 0) -> None:
        super().__init__()
        self.manifest, self.spec, self.start_batches = manifest, spec, start_batches

    # -- which shards, in which order ---------------------------------------------------------
    def shards_for(self, epoch: int, worker: int, workers: int) -> list[int]:
        order = list(range(len(self.manifest.shards)))
        random.Random(mix_seed(self.spec.seed, epoch)).shuffle(order)
        return order[self.spec.rank :: self.spec.world_size][worker::workers]

    def _locate(self, samples: int, worker: int, workers: int) -> tuple[int, int]:
        """(epoch, offset in it) of a worker's ``samples``-th sample."""
        for epoch in count():
            size = sum(self.manifest.shards[i].samples for i in self.shards_for(epoch, worker, workers))
            if samples < size:
                return epoch, samples
            samples -= size
        raise AssertionError("unreachable")

    # -- reading ------------------------------------------------------------------------------
    def read_samples(self, index: int) -> list[dict]:
        """The samples of shard ``index``, each checked before any is used; any damage is one
        DataError naming the shard."""
        spec, info = self.spec, self.manifest.shards[index]
        url = fs.join(spec.url, info.name)
        try:
            samples = read_shard(load_shard(url, spec.options, spec.cache_dir), verify=info, level=spec.verify)
            check_samples(samples, self.manifest.info, self.manifest.num_classes)
        except (DataError, OSError) as e:
            raise DataError(f"shard {url}: {e}") from None
        return samples

    def _raw_epoch(self, epoch: int, worker: int, workers: int, errors: list[int]) -> Iterator[dict]:
        spec = self.spec
        rng = random.Random(mix_seed(spec.seed, epoch, spec.rank, worker, 7))
        buffer: list[dict] = []
        for index in self.shards_for(epoch, worker, workers):
            try:
                samples = self.read_samples(index)
            except DataError as e:
                if spec.on_error == "raise":
                    raise
                errors[0] += 1
                log.warning("skipping %s", e)
                continue
            for sample in samples:
                if len(buffer) < spec.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], sample = sample, buffer[j]
                yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _batch(self, raws: list[dict], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a batch of checked samples: the flip variant picked per sample, then one draw
        from the moments."""
        kind = self.manifest.info.latent_kind
        flips = (torch.rand(len(raws), generator=generator) < 0.5).tolist()
        if not self.spec.random_flip:
            flips = [False] * len(raws)
        arrays = []
        for raw, flip in zip(raws, flips):
            if flip and "latent_flip.npy" in raw:
                array = npy_array(raw["latent_flip.npy"])
            else:
                array = npy_array(raw["latent.npy"])
                if flip and kind == "pixels":
                    array = array[..., ::-1]
            arrays.append(array)
        x = torch.from_numpy(np.stack(arrays)).float()
        if kind == "moments":
            mean, std = x.chunk(2, dim=1)
            x = torch.addcmul(mean, std, torch.randn(mean.shape, generator=generator))
        return x, torch.tensor([int(bytes(r["cls"])) for r in raws])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int] | StreamFailure]:
        try:
            yield from self._batches()
        except DataError as e:  # handed over as a value: a worker's exception would arrive
            yield StreamFailure(str(e))  # wrapped in DataLoader's traceback text

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A fresh DataLoader starts its round-robin at worker 0, but batch number start_batches
        # belongs to stream start_batches % workers: this process plays that stream.
        worker = (worker + self.start_batches) % workers
        spec, batch_size = self.spec, self.spec.batch_size
        batch_index = max(0, -(-(self.start_batches - worker) // workers))  # batches k < start, k % W == w
        start_epoch, skip = self._locate(batch_index * batch_size, worker, workers)
        errors = [0]
        raws: list[dict] = []
        for epoch in count(start_epoch):
            produced = 0
            for raw in self._raw_epoch(epoch, worker, workers, errors):
                produced += 1
                if skip:
                    skip -= 1
                    continue
                raws.append(raw)
                if len(raws) == batch_size:
                    generator = torch.Generator().manual_seed(mix_seed(spec.seed, spec.rank, worker, batch_index))
                    x, y = self._batch(raws, generator)
                    yield x, y, errors[0]
                    raws, batch_index = [], batch_index + 1
            if produced == 0:
                raise DataError(f"worker {worker} of rank {spec.rank} read no sample in epoch {epoch}: "
                                f"every one of its shards failed ({errors[0]} errors)")


def _exit_with_parent(parent: int, worker: int) -> None:
    """A loader worker's init: die with the rank that spawned it. PyTorch's own watchdog takes the
    parent's pid only after the worker has started (imported torch: seconds), so a rank killed
    before then left its workers running forever, reparented. The kernel's parent-death signal,
    set before the parent is checked, leaves no such window (it follows the spawning thread: the
    loader is started from the trainer's main thread)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):
        pass  # not Linux: the check below and PyTorch's watchdog remain
    if os.getppid() != parent:
        os._exit(0)


class StreamLoader:
    """The trainer's view of a latent cache: ``next()`` gives (x, labels); ``state_dict()`` is
    the number of batches taken (plus what must match on resume)."""

    def __init__(self, spec: StreamSpec, manifest: Manifest | None = None) -> None:
        self.spec = spec
        self.manifest = manifest or load_manifest(spec.url, spec.options)
        needed = spec.world_size * max(1, spec.num_workers)
        if len(self.manifest.shards) < needed:
            raise DataError(
                f"{spec.url!r} has {len(self.manifest.shards)} shards, fewer than ranks x loader workers "
                f"= {needed}: re-encode with a smaller --shard-size or use fewer data.num_workers"
            )
        info = self.manifest.info
        self.channels, self.image_size = info.channels, info.latent_shape[-1]
        self.class_names = tuple(info.class_names)
        self.vae, self.scaling_factor = info.vae, info.scaling_factor
        self.batches = 0
        self._iter: Iterator | None = None
        self._errors = [0] * max(1, spec.num_workers)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shard_errors(self) -> int:
        """Shards (or shard tails) skipped because they failed to read or verify."""
        return sum(self._errors)

    def _start(self) -> None:
        dataset = ShardStream(self.manifest, self.spec, start_batches=self.batches)
        workers = self.spec.num_workers
        # Its own generator: starting the iterator draws the workers' base seed, which must not
        # come from (and shift) the global RNG the model's dropout reads. Workers are spawned,
        # not forked from the trainer: a forked worker keeps the pages of the weights and
        # optimiser states the trainer rewrites every step (copy-on-write), a second copy of them
        # per worker (DiS-H/2 on 2 CPU ranks was killed for it). Not from a fork server either:
        # its workers' parent is the server, which lives as long as they do, so a killed rank's
        # workers would never see it gone (they die with their rank: _exit_with_parent).
        loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            prefetch_factor=4 if workers else None, persistent_workers=False,
                            multiprocessing_context="spawn" if workers else None,
                            worker_init_fn=partial(_exit_with_parent, os.getpid()) if workers else None,
                            generator=torch.Generator().manual_seed(mix_seed(self.spec.seed, self.batches)))
        self._iter = iter(loader)

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._start()
        item = next(self._iter)
        if isinstance(item, StreamFailure):
            self._iter = None
            raise DataError(item.message)
        x, y, errors = item
        self._errors[self.batches % len(self._errors)] = int(errors)
        self.batches += 1
        return x, y

    def state_dict(self) -> dict[str, Any]:
        s = self.spec
        return {"batches": self.batches, "seed": s.seed, "world_size": s.world_size,
                "num_workers": s.num_workers, "batch_size": s.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seed", "world_size", "num_workers", "batch_size") if state.get(k) != mine[k]]
        if changed:
            log.warning("data stream resumed with different %s: the sample order differs from the "
                        "uninterrupted run's from here on", ", ".join(changed))
        self.batches = int(state["batches"])
        self._iter = None
