"""Drawing N samples of a model on any number of ranks: the driver behind the trainer's grids,
its evaluations and ``tools/sample.py`` (``dis_dist/sample.py``, the command line; the sampler
loop itself is :func:`dis_dist.diffusion.sampling.sample`).

Samples by index: sample i depends only on (seed, i), never on the batch or rank that draws it,
so N samples are the same N images on any number of ranks and batch layouts (bit for bit when
the batches are the same, as :func:`batches_of_rank` arranges).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dis_dist.config import SampleConfig
from dis_dist.diffusion import GaussianDiffusion
from dis_dist.diffusion.sampling import sample
from dis_dist.errors import ConfigError
from dis_dist.models import DiS
from dis_dist.utils.images import to_uint8
from dis_dist.utils.seeding import mix_seed

LABEL_STREAM = 1  # labels come from a generator of their own: (seed, i, LABEL_STREAM)


@dataclass
class SampleSettings:
    """Says how to draw samples: the sampler's respacing, guidance, seed and labels."""

    sampler: str = "ddpm"  # ddpm (ancestral) or ddim
    steps: str = "250"  # respacing: "250", "ddim50", ...
    eta: float = 0.0  # ddim only
    cfg_scale: float = 1.0
    cfg_channels: str = "all"
    cfg_interval: tuple[int, int] = (0, 1000)  # model timesteps [lo, hi) that are guided
    clip_denoised: bool = False
    seed: int = 0
    labels: str = "uniform"  # uniform (random per sample), balanced (i % classes), or "3" / "0,1,7"

    @classmethod
    def of(cls, sc: SampleConfig) -> SampleSettings:
        """Take the run config's ``sample.*`` settings, with class-balanced labels (sample i is of
        class i mod classes): what grids and evaluations during training draw."""
        return cls(sampler=sc.sampler, steps=sc.steps, eta=sc.ddim_eta, cfg_scale=sc.cfg_scale,
                   cfg_channels=sc.cfg_channels, cfg_interval=tuple(sc.cfg_interval),
                   clip_denoised=sc.clip_denoised, seed=sc.seed, labels="balanced")




def sample_labels(spec: str, indices: list[int], num_classes: int, seed: int) -> Tensor:
    """Choose the class of each sample: ``uniform`` draws it from the sample's own generator,
    ``balanced`` is i mod classes, a comma list repeats its classes in turn."""
    if spec == "uniform":
        gens = (torch.Generator().manual_seed(mix_seed(seed, i, LABEL_STREAM)) for i in indices)
        return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in gens])
    if spec == "balanced":
        return torch.tensor([i % num_classes for i in indices])
    try:
        given = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(f"labels {spec!r}: choose uniform, balanced, or class indices like 3 or 0,1,7") from None
    if any(not 0 <= c < num_classes for c in given):
        raise ConfigError(f"labels {spec!r}: classes must be in [0, {num_classes})")
    return torch.tensor([given[i % len(given)] for i in indices])


def batches_of_rank(num: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """List the sample indices of the batches rank ``rank`` draws: batch b is [b*B, (b+1)*B) and goes
    to rank b mod W, so the batches themselves do not depend on the world size."""
    total = -(-num // batch_size)
    return [list(range(b * batch_size, min(num, (b + 1) * batch_size))) for b in range(rank, total, world_size)]


@dataclass
class Sampler:
    """Draws samples and turns them into images, with the (respaced) diffusion, the settings, the
    decoder of latents to images in [-1, 1], the device, and bf16 autocast. The model is given
    at each call; its shape and classes are its own (``in_channels``, ``input_size``,
    ``num_classes``)."""

    diffusion: GaussianDiffusion
    settings: SampleSettings
    decode: Callable[[Tensor], Tensor]
    device: torch.device
    bf16: bool = False

    def generate(self, model: DiS, indices: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Draw samples ``indices``; return uint8 (n, H, W, 3) images (one channel repeated to three)
        and their labels (None for an unconditional model)."""
        settings, device, num_classes = self.settings, self.device, model.num_classes
        gens = [torch.Generator(device).manual_seed(mix_seed(settings.seed, i)) for i in indices]
        noise = torch.stack([torch.randn(model.in_channels, model.input_size, model.input_size, generator=g,
                                         device=device) for g in gens])
        labels = sample_labels(settings.labels, indices, num_classes, settings.seed).to(device) if num_classes else None
        autocast = torch.autocast(device.type, torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            latents = sample(
                model, self.diffusion, noise, labels=labels, null_class=num_classes or None,
                sampler=settings.sampler, ddim_eta=settings.eta, cfg_scale=settings.cfg_scale,
                cfg_channels=settings.cfg_channels, cfg_interval=settings.cfg_interval,
                clip_denoised=settings.clip_denoised, generator=gens,
            )
        images = to_uint8(self.decode(latents.float()))
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        return images, None if labels is None else labels.cpu().numpy()

    def share(
        self, model: DiS, num: int, batch_size: int, *, rank: int, world_size: int, collective: bool = False,
        done: Callable[[list[int]], bool] | None = None,
    ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray | None]]:
        """Yield this rank's share of samples 0..num-1 (:func:`batches_of_rank`), a batch at a time:
        (indices, images, labels). ``done``: batches already drawn (a resumed run's), skipped.
        With a ``collective`` model (a sharded one, whose forward pass gathers weights from every
        rank) a rank with fewer batches draws throwaway ones so that every rank calls the model
        equally often."""
        if collective and done is not None:
            raise ValueError("a collective model draws every batch: ranks cannot skip different ones")
        mine = [b for b in batches_of_rank(num, batch_size, rank, world_size) if done is None or not done(b)]
        rounds = len(batches_of_rank(num, batch_size, 0, world_size)) if collective else len(mine)
        for r in range(rounds):
            if r < len(mine):
                yield mine[r], *self.generate(model, mine[r])
            else:
                self.generate(model, [0])
