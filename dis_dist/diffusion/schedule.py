"""Noise schedules and timestep respacing (improved-DDPM / DiT conventions)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dis_dist.errors import ConfigError

SCHEDULES = ("linear", "cosine")


def beta_schedule(name: str, num_steps: int) -> Tensor:
    """float64 betas. ``linear``: 1e-4..0.02 scaled to ``num_steps`` (as DiT); ``cosine``: Nichol & Dhariwal."""
    if name == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if name == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
            for i in range(num_steps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ConfigError(f"unknown noise schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")


def _parse_counts(text: str) -> tuple[str, int] | list[int]:
    if text.startswith("ddim"):
        return ("ddim", int(text[len("ddim"):]))
    return [int(x) for x in text.split(",")]


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int] | tuple[str, int]) -> list[int]:
    """Timesteps of the base process to keep (sorted).

    ``section_counts`` is an int or "250" (evenly strided), "ddim50" (the DDIM paper's fixed
    stride), or "10,15,20" (that many steps in each of equal-size sections).
    """
    if isinstance(section_counts, str):
        try:
            parsed = _parse_counts(section_counts)
        except ValueError:
            raise ConfigError(
                f"timestep respacing {section_counts!r} is not an int, 'ddimN' or 'N,M,...'"
            ) from None
        return space_timesteps(num_timesteps, parsed)
    if isinstance(section_counts, tuple):  # ("ddim", N)
        desired = section_counts[1]
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ConfigError(f"cannot take exactly {desired} steps of {num_timesteps} with a fixed stride")
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count <= 0 or size < count:
            raise ConfigError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))
