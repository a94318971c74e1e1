"""One entry point for drawing samples from a model: DDPM or DDIM, with or without guidance."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from dis_dist.diffusion.gaussian import GaussianDiffusion, Generators
from dis_dist.diffusion.guidance import guided_model


@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    diffusion: GaussianDiffusion,
    noise: Tensor,
    *,
    labels: Tensor | None = None,
    null_class: int | None = None,
    sampler: Literal["ddpm", "ddim"] = "ddpm",
    ddim_eta: float = 0.0,
    cfg_scale: float = 1.0,
    cfg_channels: str = "all",
    cfg_interval: tuple[int, int] = (0, 1000),
    clip_denoised: bool = False,
    generator: Generators = None,
) -> Tensor:
    """x_0 from x_T = ``noise``. ``labels`` None means an unconditional model. Randomness
    after x_T comes from ``generator`` only, so a fixed generator gives fixed samples (a list
    of generators, one per sample, makes each sample independent of its batch)."""
    kwargs: dict = {}
    if labels is not None:
        if null_class is None:
            raise ValueError("null_class is needed to sample a class-conditional model")
        model = guided_model(
            model, cfg_scale, null_class=null_class, in_channels=noise.shape[1], channels=cfg_channels,
            interval=tuple(cfg_interval),
        )
        kwargs = {"y": labels}
    steps = diffusion.p_sample_loop_progressive(
        model,
        tuple(noise.shape),
        noise=noise,
        model_kwargs=kwargs,
        clip_denoised=clip_denoised,
        generator=generator,
        eta=None if sampler == "ddpm" else ddim_eta,
    )
    return deque(steps, maxlen=1)[0]
