"""The bidirectional selective scan with each sample's sequence split over the ranks of a
context-parallel group: rank r holds tokens [start_r, end_r), contiguous, in rank order.

A selective scan is a linear recurrence, so the split is exact. Each rank scans its slice from a
zero state and reports, per sample and direction, its slice's final state ``h`` and total decay
``log P = A * sum(delta)`` (both (b, d, N): nothing grows with L). After one all-gather of them,
each rank composes the state entering its slice from the slices before it in scan order (left
ones for direction 0, right ones for direction 1),

    h_in = sum_j exp(log P of the slices between j and this one) * h_j,

and adds what that state contributes to its outputs: the same scan with zero input started from
``h_in`` (``y_t += C_t . (exp(A * cumsum(delta))_t * h_in)``), run by the scan backend, so its
memory bounds hold. Gradients take the way back: the all-gather's backward sums every rank's
gradient of each gathered state and hands it to the rank that produced it.

Every rank builds the same autograd graph (a rank with no slice before it composes zeros through
the same operations), so all ranks issue their backward collectives in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dis_dist.ops.selective_scan import selective_scan
from dis_dist.ops.selective_scan.reference import prepare_delta


class _AllGather(torch.autograd.Function):
    """Stack of every rank's ``t`` (same shape on all ranks); the backward sums the gradients of
    each rank's entry over the group and returns each rank its own."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # noqa: D102
        ctx.group = group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather_with_grad(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """(world, *t.shape): every rank's ``t``, differentiable (see :class:`_AllGather`)."""
    return _AllGather.apply(t, group)


def incoming_states(last: Tensor, log_decay: Tensor, position: int) -> Tensor:
    """The state entering the slice at ``position`` (in scan order) of slices whose zero-start
    final states are ``last`` and total log-decays ``log_decay`` (both (k, ...) in scan order):
    sum over j < position of exp(log_decay[j+1:position].sum()) * last[j]."""
    k = last.shape[0]
    # S[j] = log_decay[0..j].sum(); the decay from after slice j to before ``position`` is
    # S[position - 1] - S[j] (<= 0, decays are <= 1). Slices at or after ``position`` get -inf.
    cum = log_decay.cumsum(0)
    before = torch.arange(k, device=last.device) < position
    shape = (k,) + (1,) * (last.dim() - 1)
    end = cum[position - 1] if position > 0 else torch.zeros_like(cum[0])
    exponent = torch.where(before.view(shape), end - cum, torch.full_like(cum, -torch.inf))
    return (exponent.exp() * last).sum(0)


def cp_bidirectional_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`~dis_dist.ops.selective_scan.bidirectional_selective_scan` on this rank's slice of
    the sequence (same arguments, L = the slice's length; ``group``: the context-parallel ranks,
    in sequence order). Equal to the unsplit scan's outputs on the slice, gradients included."""
    rank, k = dist.get_rank(group), dist.get_world_size(group)
    compute = torch.promote_types(u.dtype, torch.float32)
    lasts, log_decays, zero_start, in_scan_order = [], [], [], []
    for direction in (0, 1):
        seq = [t[direction].flip(-1) if direction else t[direction] for t in (u, delta, B, C)]
        seq[0] = seq[0].to(compute)  # the outputs in the compute dtype: rounded once, at the end
        bias = None if delta_bias is None else delta_bias[direction]
        y, last = selective_scan(
            seq[0], seq[1], A[direction], seq[2], seq[3], D=None if D is None else D[direction],
            delta_bias=bias, delta_softplus=delta_softplus, return_last_state=True, backend=backend,
        )
        step = prepare_delta(seq[1].to(compute), None if bias is None else bias.to(compute), delta_softplus)
        in_scan_order.append(seq[1:])
        zero_start.append(y)
        lasts.append(last.to(compute))
        log_decays.append(A[direction].to(compute) * step.sum(-1)[..., None])  # (b, d, N)
    # (k, 2 directions, 2 [state, log-decay], b, d, N): one collective per call
    gathered = all_gather_with_grad(torch.stack([torch.stack(lasts), torch.stack(log_decays)], dim=1), group)
    out = []
    for direction in (0, 1):
        # Scan order: ranks left to right for direction 0, right to left for direction 1.
        ordered = gathered[:, direction] if direction == 0 else gathered[:, direction].flip(0)
        position = rank if direction == 0 else k - 1 - rank
        h_in = incoming_states(ordered[:, 0], ordered[:, 1], position)
        seq = in_scan_order[direction]
        correction = selective_scan(
            torch.zeros_like(seq[0], dtype=compute), seq[0], A[direction], seq[1], seq[2],
            delta_bias=None if delta_bias is None else delta_bias[direction], delta_softplus=delta_softplus,
            initial_state=h_in, backend=backend,
        )
        y = zero_start[direction] + correction
        out.append(y.flip(-1) if direction else y)
    y = out[0] + out[1]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(u.dtype)


def halo_exchange(x: Tensor, width: int, group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """The ``width`` tokens (last axis) before and after this rank's slice ``x`` (b, d, l): the
    left neighbour's last and the right neighbour's first, zeros at the sequence's ends (where
    the unsplit causal conv pads with zeros). Differentiable; every slice needs l >= width."""
    rank, k = dist.get_rank(group), dist.get_world_size(group)
    if x.shape[-1] < width:
        raise ValueError(f"a context-parallel slice of {x.shape[-1]} tokens is shorter than the conv halo ({width})")
    edges = all_gather_with_grad(torch.stack([x[..., :width], x[..., -width:]]), group)  # (k, 2, b, d, w)
    has_left, has_right = float(rank > 0), float(rank < k - 1)
    left = edges[(rank - 1) % k, 1] * has_left
    right = edges[(rank + 1) % k, 0] * has_right
    return left, right
