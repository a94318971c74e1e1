"""Exponential moving average of model weights."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(decay: float, num_updates: int, warmup: bool) -> float:
    """The decay of update number ``num_updates`` (0-based); with warm-up min(decay, (1+n)/(10+n))."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (same structure)."""
    ema_params = [p for p in ema.parameters()]
    model_params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
