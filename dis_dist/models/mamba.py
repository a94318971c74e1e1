"""Bidirectional Mamba mixer of DiS (Vim's "v2" layout): one input projection, a forward and a
backward selective-SSM branch with their own conv/projections/A/D, summed, one output projection.

The backward branch is the forward computation on the reversed sequence, reversed back. It is
computed here without reversed copies: its causal conv on the reversed sequence is an
anti-causal conv (flipped kernel, padding on the right) on the original one, and the scan
backend runs that branch right to left.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dis_dist.ops.selective_scan import bidirectional_selective_scan


class SSMBranch(nn.Module):
    """The parameters of one scan direction: depthwise causal conv, x_proj, dt_proj, A_log, D."""

    def __init__(
        self,
        d_inner: int,
        d_state: int,
        d_conv: int,
        dt_rank: int,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.dt_rank, self.d_state = dt_rank, d_state
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.dt_proj.bias._no_reinit = True  # keeps its dt init through the model's init
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's init: S4D-real A, D = 1, dt_proj so that softplus(bias) ~ LogUniform[dt_min, dt_max]."""
        self.conv1d.reset_parameters()
        self.x_proj.reset_parameters()
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        d_inner = self.D.shape[0]
        log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(d_inner) * (log_hi - log_lo) + log_lo).clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(a).expand(d_inner, -1))
        self.D.fill_(1.0)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, d, L) after conv -> delta (b, d, L) without bias, B and C (b, N, L)."""
        x_dbl = self.x_proj(x.transpose(1, 2))
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)
        return delta, B.transpose(1, 2), C.transpose(1, 2)


class BiMamba(nn.Module):
    """Bidirectional Mamba mixer: (batch, L, d_model) -> (batch, L, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_conv = d_conv
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.fwd = SSMBranch(self.d_inner, d_state, d_conv, self.dt_rank)
        self.bwd = SSMBranch(self.d_inner, d_state, d_conv, self.dt_rank)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, hidden: Tensor) -> Tensor:
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        pad = self.d_conv - 1
        conv_f, conv_b = self.fwd.conv1d, self.bwd.conv1d
        x_f = F.conv1d(x, conv_f.weight, conv_f.bias, padding=pad, groups=self.d_inner)[..., :length]
        # Causal conv of the reversed sequence, reversed back == anti-causal conv, flipped kernel.
        x_b = F.conv1d(x, conv_b.weight.flip(-1), conv_b.bias, padding=pad, groups=self.d_inner)
        x_f, x_b = F.silu(x_f), F.silu(x_b[..., pad:])
        delta_f, B_f, C_f = self.fwd.project(x_f)
        delta_b, B_b, C_b = self.bwd.project(x_b)
        y = bidirectional_selective_scan(
            torch.stack([x_f, x_b]),
            torch.stack([delta_f, delta_b]),
            -torch.exp(torch.stack([self.fwd.A_log, self.bwd.A_log])),
            torch.stack([B_f, B_b]),
            torch.stack([C_f, C_b]),
            D=torch.stack([self.fwd.D, self.bwd.D]),
            z=z,
            delta_bias=torch.stack([self.fwd.dt_proj.bias, self.bwd.dt_proj.bias]),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return self.out_proj(y.transpose(1, 2))
