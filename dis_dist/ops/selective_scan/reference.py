"""The plain selective-scan recurrence: the ground truth every other backend is tested against.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d, state n)
    y_t = <C_t, h_t> + D * u_t,   out = y * silu(z)

Written so that autograd through it is linear in L: the per-step tensors are split with
``unbind`` before the loop (its backward is one ``stack``), never sliced inside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _recurrence(
    delta: Tensor, A: Tensor, B: Tensor, C: Tensor, u: Tensor, h: Tensor
) -> tuple[Tensor, Tensor]:
    """Run the recurrence over the last axis. delta, u: (..., d, L); A: (..., d, N);
    B, C: (..., N, L); h: (..., d, N). Returns y (..., d, L) and the last state."""
    ys = []
    steps = zip(delta.unbind(-1), (delta * u).unbind(-1), B.unbind(-1), C.unbind(-1))
    for delta_t, du_t, B_t, C_t in steps:
        dA = torch.exp(delta_t.unsqueeze(-1) * A)
        h = torch.addcmul(du_t.unsqueeze(-1) * B_t.unsqueeze(-2), dA, h)
        ys.append(torch.matmul(h, C_t.unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys, dim=-1), h


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan in mamba-ssm's layout: u, delta, z (b, d, L); A (d, N); B, C (b, N, L).

    Computes in float32 (float64 inputs stay float64); returns u's dtype and, when asked,
    the last state (b, d, N) in the compute dtype.
    """
    dtype_in = u.dtype
    compute = torch.promote_types(dtype_in, torch.float32)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    delta = prepare_delta(delta, None if delta_bias is None else delta_bias.to(compute), delta_softplus)
    batch, dim, _ = u.shape
    h0 = (
        initial_state.to(compute)
        if initial_state is not None
        else u.new_zeros(batch, dim, A.shape[-1])
    )
    y, last = _recurrence(delta, A, B, C, u, h0)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(dtype_in)
    return (out, last) if return_last_state else out


def bidirectional_selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Sum of a forward scan of direction 0 and a right-to-left scan of direction 1.

    Per-direction inputs carry a leading axis of 2 and are all in the sequence's own order:
    u, delta (2, b, d, L); A (2, d, N); B, C (2, b, N, L); D, delta_bias (2, d).
    z (b, d, L) gates both directions. Returns (b, d, L) in u's dtype.
    """
    dtype_in = u.dtype
    compute = torch.promote_types(dtype_in, torch.float32)

    def flip_bwd(t: Tensor) -> Tensor:  # direction 1 runs right to left: reverse its time axis
        return torch.stack([t[0], t[1].flip(-1)])

    u, delta, B, C = (flip_bwd(t.to(compute)) for t in (u, delta, B, C))
    A = A.to(compute)
    bias = None if delta_bias is None else delta_bias.to(compute)[:, None]  # (2, 1, d)
    delta = prepare_delta(delta, bias, delta_softplus)
    h0 = u.new_zeros(*u.shape[:3], A.shape[-1])
    y, _ = _recurrence(delta, A[:, None], B, C, u, h0)
    if D is not None:
        y = y + u * D.to(compute)[:, None, :, None]
    y = flip_bwd(y).sum(0)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)
