"""Gaussian diffusion (improved DDPM, as used by DiT/DiS): schedules, losses, samplers, guidance."""

from __future__ import annotations

import torch

from dis_dist.diffusion.gaussian import GaussianDiffusion, MeanVariance
from dis_dist.diffusion.guidance import guided_model
from dis_dist.diffusion.schedule import beta_schedule, space_timesteps


def create_diffusion(
    timestep_respacing: str | int | None = None,
    *,
    num_steps: int = 1000,
    schedule: str = "linear",
    learn_sigma: bool = True,
    min_snr_gamma: float = 0.0,
) -> GaussianDiffusion:
    """The base process (``timestep_respacing`` None/"") or one respaced to a subset of its steps,
    e.g. ``create_diffusion("250")`` or ``create_diffusion("ddim50")``."""
    betas = beta_schedule(schedule, num_steps)
    if timestep_respacing in (None, ""):
        return GaussianDiffusion(betas, learn_sigma=learn_sigma, min_snr_gamma=min_snr_gamma)
    keep = space_timesteps(num_steps, timestep_respacing)
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    kept_ac = alphas_cumprod[keep]
    prev = torch.cat([kept_ac.new_ones(1), kept_ac[:-1]])
    new_betas = 1.0 - kept_ac / prev
    return GaussianDiffusion(new_betas, learn_sigma=learn_sigma, timestep_map=torch.tensor(keep),
                             min_snr_gamma=min_snr_gamma)


__all__ = [
    "GaussianDiffusion",
    "MeanVariance",
    "beta_schedule",
    "create_diffusion",
    "guided_model",
    "space_timesteps",
]
