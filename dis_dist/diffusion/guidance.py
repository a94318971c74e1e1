"""Classifier-free guidance as a model wrapper the samplers call like the model itself."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dis_dist.errors import ConfigError

CFG_CHANNELS = ("all", "first3")


def guided_model(
    model: Callable[..., Tensor],
    scale: float,
    *,
    null_class: int,
    in_channels: int,
    channels: str = "all",
) -> Callable[..., Tensor]:
    """Return f(x, t, y) = the model's output with its eps replaced by
    eps_uncond + scale * (eps_cond - eps_uncond), in fp32; cond and uncond run as one doubled batch.

    ``channels="all"`` guides every eps channel; ``"first3"`` only the first three (DiT's
    reproducibility convention for 4-channel latents). The variance channels are the
    conditional ones.
    """
    if channels not in CFG_CHANNELS:
        raise ConfigError(f"unknown guidance channels {channels!r}; choose one of: {', '.join(CFG_CHANNELS)}")
    if scale == 1.0:
        return model
    guided = in_channels if channels == "all" else min(3, in_channels)

    def forward(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        null = torch.full_like(y, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.float().chunk(2)  # the difference of two bf16 outputs loses bits: fp32
        eps = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
        return torch.cat([eps, cond[:, guided:]], dim=1)

    return forward
