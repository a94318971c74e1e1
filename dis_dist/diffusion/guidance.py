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
    interval: tuple[int, int] = (0, 1000),
) -> Callable[..., Tensor]:
    """Return f(x, t, y) = the model's output with its eps replaced by
    eps_uncond + scale * (eps_cond - eps_uncond), in fp32; cond and uncond run as one doubled batch.

    ``interval`` (lo, hi): guidance only at the model timesteps lo <= t < hi, the conditional
    output alone elsewhere (a step where no sample is guided costs one forward pass, not two).
    Guiding the noisiest steps costs diversity, the last ones sharpen noise (Kynkaanniemi et al.
    2024, "Applying guidance in a limited interval").

    ``channels="all"`` guides every eps channel; ``"first3"`` only the first three (DiT's
    reproducibility convention for 4-channel latents). The variance channels are the
    conditional ones.
    """
    if channels not in CFG_CHANNELS:
        raise ConfigError(f"unknown guidance channels {channels!r}; choose one of: {', '.join(CFG_CHANNELS)}")
    lo, hi = interval
    if lo >= hi:
        raise ConfigError(f"guidance interval [{lo}, {hi}) is empty: give lo < hi (sample.cfg_interval)")
    if scale == 1.0:
        return model
    guided = in_channels if channels == "all" else min(3, in_channels)

    def forward(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        on = (t >= lo) & (t < hi)
        if not bool(on.any()):
            return model(x, t, y).float()
        null = torch.full_like(y, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.float().chunk(2)  # the difference of two bf16 outputs loses bits: fp32
        eps = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
        if not bool(on.all()):
            eps = torch.where(on.view(-1, *[1] * (eps.ndim - 1)), eps, cond[:, :guided])
        return torch.cat([eps, cond[:, guided:]], dim=1)

    return forward
