"""Building blocks of DiS around the mixer: embedders, stochastic depth, the final layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in fp32, or as it is when wider (the float64 models of the tests stay float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in fp32 (or wider) whatever the dtype of its input, of its weight (a
    bf16 copy under FSDP's mixed precision) or of autocast: the norm of the fp32 residual stream,
    as the reference code computes it in fp32 training."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else at_least_fp32(self.weight)
        return F.rms_norm(at_least_fp32(x), self.normalized_shape, weight, self.eps)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (batch,) -> (batch, dim): [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal(width) -> Linear(D, 4D) -> SiLU -> Linear(4D, D): the time token."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.width)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> embeddings. Row ``num_classes`` is the null class of classifier-free
    guidance; in training, labels are replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, width: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's branch with probability p in training (rescaled)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class FinalLayer(nn.Module):
    """LayerNorm (no affine), shift/scale modulation from the condition (if any), then the
    per-token linear to patch pixels. Zero-initialised, as in DiT."""

    def __init__(self, width: int, patch_size: int, out_channels: int, conditional: bool) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = (
            nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width)) if conditional else None
        )

    def reset_parameters(self) -> None:
        layers = [self.linear] + ([self.adaLN_modulation[1]] if self.adaLN_modulation else [])
        for layer in layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        x = self.norm_final(x)
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
            x = x * (1 + scale[:, None]) + shift[:, None]
        return self.linear(x)
