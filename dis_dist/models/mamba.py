"""Bidirectional Mamba mixer of DiS (Vim's "v2" layout): one input projection, a forward and a
backward selective-SSM branch with their own conv/projections/A/D, summed, one output projection.

The backward branch is the forward computation on the reversed sequence, reversed back. It is
computed here without reversed copies: its causal conv on the reversed sequence is an
anti-causal conv (flipped kernel, padding on the right) on the original one, and the scan
backend runs that branch right to left.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dis_dist.models.layers import at_least_fp32
from dis_dist.ops.selective_scan import Directions, arrange_directions, bidirectional_selective_scan, resolve_backend
from dis_dist.ops.selective_scan.context_parallel import cp_bidirectional_selective_scan, halo_exchange
from dis_dist.ops.selective_scan.cpu import depthwise_conv_silu_cpu


class DeltaProjection(nn.Linear):
    """dt_proj: a Linear of its own class, so that mixed-precision policies that lower Linear
    layers to bf16 by class (DeepSpeed's torch_autocast) leave its bias, the dt bias, in fp32."""


class SSMBranch(nn.Module):
    """The parameters of one scan direction (depthwise causal conv, x_proj, dt_proj, A_log, D),
    and what they make of the mixer's input: the scan's inputs for that direction."""

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
        self.dt_proj = DeltaProjection(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        if not self.D.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Mamba's init (see :meth:`init_tensor`), from ``generator`` (default: the global RNG)."""
        for name, p in self.named_parameters():
            self.init_tensor(name, p, generator)

    @torch.no_grad()
    def init_tensor(self, name: str, t: Tensor, generator: torch.Generator | None) -> None:
        """Fill ``t``, the whole initial value of this branch's parameter ``name``: PyTorch's
        default init for the conv and x_proj, S4D-real A, D = 1, and dt_proj so that
        softplus(bias) ~ LogUniform[dt_min, dt_max]."""
        if name in ("conv1d.weight", "x_proj.weight"):
            nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
        elif name == "conv1d.bias":  # PyTorch's default: U(+-1/sqrt(fan_in)), fan_in = d_conv
            bound = 1 / math.sqrt(self.conv1d.kernel_size[0])
            nn.init.uniform_(t, -bound, bound, generator=generator)
        elif name == "dt_proj.weight":
            std = self.dt_rank**-0.5
            nn.init.uniform_(t, -std, std, generator=generator)
        elif name == "dt_proj.bias":
            log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
            dt = torch.rand(t.shape, generator=generator, device=t.device) * (log_hi - log_lo) + log_lo
            dt = torch.exp(dt).clamp(min=self.dt_init_floor)
            t.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name == "A_log":
            t.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(t.shape))
        elif name == "D":
            t.fill_(1.0)
        else:
            raise KeyError(f"SSMBranch has no parameter {name!r}")

    def forward(self, x: Tensor, reverse: bool = False, halo: Tensor | None = None) -> tuple[Tensor, ...]:
        """x (b, d, L) -> the scan's inputs of this direction, in sequence order: u, delta
        without bias (b, d, L), B, C (b, N, L), and A, D, the delta bias in fp32, as the
        reference DiS code casts them (new tensors: a sharded strategy may free its gathered
        parameters when this returns). ``reverse``: the branch of the reversed sequence, whose
        causal conv is an anti-causal conv with the kernel flipped. ``halo`` (b, d, d_conv - 1):
        the tokens before x (after it, ``reverse``) where x is a slice of the sequence (context
        parallelism); zeros, the padding, otherwise."""
        length, pad = x.shape[-1], self.conv1d.kernel_size[0] - 1
        weight = self.conv1d.weight.flip(-1) if reverse else self.conv1d.weight
        u = F.conv1d(x, weight, self.conv1d.bias, padding=pad, groups=x.shape[1])
        u = u[..., pad:] if reverse else u[..., :length]
        if halo is not None:  # what the halo adds where the padding was: to the first (last) pad outputs
            edge = torch.cat([halo, torch.zeros_like(halo)] if not reverse else [torch.zeros_like(halo), halo], -1)
            from_halo = F.conv1d(edge, weight, groups=x.shape[1])  # (b, d, pad)
            if reverse:
                u = torch.cat([u[..., : length - pad], u[..., length - pad :] + from_halo], -1)
            else:
                u = torch.cat([u[..., :pad] + from_halo, u[..., pad:]], -1)
        u = F.silu(u)
        x_dbl = self.x_proj(rearrange(u, "b d l -> b l d"))
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = rearrange(F.linear(dt, self.dt_proj.weight), "b l d -> b d l")
        A = -torch.exp(at_least_fp32(self.A_log))
        D = at_least_fp32(self.D).clone()
        delta_bias = at_least_fp32(self.dt_proj.bias).clone()
        return u, delta, A, rearrange(B, "b l n -> b n l"), rearrange(C, "b l n -> b n l"), D, delta_bias


class BiMamba(nn.Module):
    """Bidirectional Mamba mixer: (batch, L, d_model) -> (batch, L, d_model). With a
    ``cp_group`` (context parallelism), L is this rank's slice of the sequence: the convs take
    their halo from the neighbouring slices and the scan its incoming states from the ranks
    before it in each direction (dis_dist/ops/selective_scan/context_parallel.py)."""

    # Whether the cpu backend takes the fused path (:meth:`_native_scan_inputs`) where the dtypes
    # allow; off, the generic one (tools/bench_demo.py times both).
    native_cpu: bool = True

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
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.fwd = SSMBranch(self.d_inner, d_state, d_conv, self.dt_rank)
        self.bwd = SSMBranch(self.d_inner, d_state, d_conv, self.dt_rank)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.cp_group: dist.ProcessGroup | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        # x and z (b, d_inner, L) by a matmul each: their gradients then reach in_proj's weight and
        # input as they are, not concatenated into one (b, L, 2 d_inner) gradient and copied again.
        x, z = (rearrange(F.linear(hidden, w), "b l d -> b d l") for w in self.in_proj.weight.chunk(2))
        backend = resolve_backend(self.scan_backend, x.device).name
        scan, group = bidirectional_selective_scan, {}
        if self.cp_group is not None:
            scan, group = cp_bidirectional_selective_scan, {"group": self.cp_group}
            inputs = self._scan_inputs(x, backend, *halo_exchange(x, self.fwd.conv1d.kernel_size[0] - 1, self.cp_group))
        elif backend == "cpu" and self.native_cpu and self._native_dtypes(x):
            inputs = self._native_scan_inputs(x)
        else:
            inputs = self._scan_inputs(x, backend)
        u, delta, A, B, C, D, delta_bias = inputs
        y = scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True, backend=backend, **group)
        return self.out_proj(rearrange(y, "b d l -> b l d"))

    def _scan_inputs(
        self, x: Tensor, backend: str, left: Tensor | None = None, right: Tensor | None = None
    ) -> Iterator[Directions]:
        """Each scan input as a (forward, backward) pair, read or stacked as ``backend`` wants;
        the backward branch computed on the sequence as it is (scanned right to left)."""
        return arrange_directions(zip(self.fwd(x, halo=left), self.bwd(x, True, right)), backend, x.device)

    def _native_dtypes(self, x: Tensor) -> bool:
        """Whether the native CPU kernels take x and the branches' weights as they are (fp32 or
        fp64 throughout, no autocast)."""
        return (x.dtype in (torch.float32, torch.float64) and self.fwd.conv1d.weight.dtype == x.dtype
                and not torch.is_autocast_enabled(x.device.type))

    def _native_scan_inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """What :meth:`SSMBranch.forward` computes, for both branches at once and written stacked
        (2, ...) in the native CPU scan's channels-last layout: both convs and their SiLU in one
        kernel, x_proj and dt_proj as matmuls batched over the directions, so no input is copied
        to be stacked. u, delta (2, b, d, L); A (2, d, N); B, C (2, b, N, L); D, delta bias (2, d)."""
        def both(get: Callable[[SSMBranch], Tensor]) -> Tensor:
            return torch.stack([get(self.fwd), get(self.bwd)])

        batch, n = x.shape[0], self.fwd.d_state
        u = depthwise_conv_silu_cpu(x, both(lambda m: m.conv1d.weight[:, 0]), both(lambda m: m.conv1d.bias))
        rows = rearrange(u, "two b d l -> two (b l) d")
        x_dbl = torch.bmm(rows, both(lambda m: m.x_proj.weight).transpose(1, 2))
        dt, B, C = x_dbl.split([self.dt_rank, n, n], dim=-1)
        delta = torch.bmm(dt, both(lambda m: m.dt_proj.weight).transpose(1, 2))
        delta = rearrange(delta, "two (b l) d -> two b d l", b=batch)
        B, C = (rearrange(t.contiguous(), "two (b l) n -> two b n l", b=batch) for t in (B, C))
        A = -torch.exp(at_least_fp32(both(lambda m: m.A_log)))
        return u, delta, A, B, C, at_least_fp32(both(lambda m: m.D)), at_least_fp32(both(lambda m: m.dt_proj.bias))
