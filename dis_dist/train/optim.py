"""The optimiser and its schedules: AdamW, its learning rate (linear warm-up, then constant or
cosine decay to a floor), and the decay of the weights' moving average (EMA)."""

from __future__ import annotations

import math

import torch

from dis_dist.config import OptimConfig


def adamw(groups: list[dict], opt: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over parameter ``groups`` with the run's settings, fused (one pass over each
    parameter and its states, rather than a few kernels per group and state) on GPUs and CPUs."""
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                             fused=True if device.type in ("cuda", "cpu") else None)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(decay: float, num_updates: int, warmup: bool) -> float:
    """The EMA decay of update number ``num_updates`` (0-based); with warm-up min(decay, (1+n)/(10+n))."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay
