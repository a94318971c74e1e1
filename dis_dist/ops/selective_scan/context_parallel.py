"""The bidirectional selective scan with each sample's sequence split over the ranks of a
context-parallel group: rank r holds tokens [start_r, end_r), contiguous, in rank order.

A selective scan is a linear recurrence, so the split is exact. Each rank scans its slice from a
zero state and reports, per sample and direction, its slice's final state ``h`` and total decay
``log P = A * sum(delta)`` (both (b, d, N): nothing grows with L). After one all-gather of them,
each rank composes the state entering its slice from the slices before it in scan order (left
ones for direction 0, right ones for direction 1),

    h_in = sum_j exp(log P of the slices between j and this one) * h_j,

and adds what that state contributes to its outputs, ``y_t += C_t . (exp(A * cumsum(delta))_t *
h_in)`` (the scan with zero input from ``h_in``, in closed form: a readout kernel compiled where
the chunked scan's are, over chunks of tokens, recomputed in the backward pass, so a rank keeps
only the scan steps beyond what the unsplit scan keeps). Gradients take the way back: the
all-gather's backward sums every rank's gradient of each gathered state and hands it to the rank
that produced it.

Sequences enter and leave the model whole: :func:`slice_bounds` says which tokens a rank keeps,
:func:`gather_sequence` reassembles per-token outputs on every rank of the group.

Every rank builds the same autograd graph (a rank with no slice before it composes zeros through
the same operations), so all ranks issue their backward collectives in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from dis_dist.ops.selective_scan import Directions, selective_scan, stack_directions
from dis_dist.ops.selective_scan.chunked import _compile_failed, _compile_wanted
from dis_dist.ops.selective_scan.reference import prepare_delta

log = logging.getLogger(__name__)


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


def _in_scan_order(t: Tensor, direction: int) -> Tensor:
    """Direction ``direction``'s (b, ., L) entry of a stacked (2, b, ., L) input, in its scan order."""
    return t[direction].flip(-1) if direction else t[direction]


def _log_decays(delta: Tensor, A: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """(2, b, d, N): each direction's A * (sum of its steps over the slice), in fp32 at least."""
    compute = torch.promote_types(delta.dtype, torch.float32)
    bias = None if delta_bias is None else delta_bias.to(compute)[:, None]  # (2, 1, d): over the batch
    step = prepare_delta(delta.to(compute), bias, delta_softplus)
    return A.to(compute)[:, None] * step.sum(-1)[..., None]


READOUT_CHUNK = 64  # tokens per call of the readout kernels (the last call padded)


# Decays below e^-60 (1e-26) are taken as 0: they count for nothing beside the terms they are
# added to, and products of them drift into subnormal numbers, which make every operation on
# them many times slower on CPUs.
LOG_DECAY_CUTOFF = -60.0


def _decay(A: Tensor, cum: Tensor) -> Tensor:
    """exp(A * cum) (2, b, d, N, T), 0 where the exponent is below LOG_DECAY_CUTOFF."""
    exponent = A[..., None] * cum[..., None, :]
    return torch.where(exponent > LOG_DECAY_CUTOFF, torch.exp(exponent), 0.0)


def readout_forward(cum: Tensor, A: Tensor, C: Tensor, h: Tensor) -> Tensor:
    """y = sum_n C_n * h_n * exp(A_n * cum): cum (2, b, d, T) the cumulative steps in scan order,
    A (2, 1, d, N), C (2, b, N, T), h (2, b, d, N) -> (2, b, d, T). A <= 0 and cum >= 0: the
    exponent is never positive."""
    decay = _decay(A, cum)  # (2, b, d, N, T)
    return (decay * h[..., None] * C[..., None, :, :]).sum(-2)


def readout_backward(cum: Tensor, A: Tensor, C: Tensor, h: Tensor, grad: Tensor) -> tuple[Tensor, ...]:
    """Gradients of :func:`readout_forward` for dL/dy ``grad``: (cum, A unreduced over b, h, C)."""
    decay = _decay(A, cum)
    g_c = grad[..., None, :] * C[..., None, :, :]  # (2, b, d, N, T)
    w = g_c * decay * h[..., None]  # dL/d(A * cum)
    return ((w * A[..., None]).sum(-2), (w * cum[..., None, :]).sum(-1), (g_c * decay).sum(-1),
            (grad[..., None, :] * decay * h[..., None]).sum(-3))


_readout_kernels: dict[str, tuple[Callable, Callable]] = {}


def _readout(which: int, *args: Tensor) -> tuple[Tensor, ...] | Tensor:
    """The readout kernel ``which`` (0 forward, 1 backward), compiled where the chunked scan
    compiles its kernels (fused loops: the (2, b, d, N, T) decays are never written out)."""
    device = args[0].device
    eager = (readout_forward, readout_backward)[which]
    if not _compile_wanted(device):
        return eager(*args)
    if device.type not in _readout_kernels:
        _readout_kernels[device.type] = (torch.compile(readout_forward, dynamic=False),
                                         torch.compile(readout_backward, dynamic=False))
    try:
        return _readout_kernels[device.type][which](*args)
    except Exception as e:  # compiler missing or broken: the eager kernel computes the same
        _compile_failed.add(device.type)
        log.warning("torch.compile of the context-parallel readout failed on %s (%s); running it eagerly",
                    device.type, e)
        return eager(*args)


def _readout_chunks(*tensors: Tensor) -> list[tuple]:
    """Each READOUT_CHUNK tokens of ``tensors`` (last axis), zero-padded to the full chunk, and
    the number of real tokens: a zero step and a zero C add nothing."""
    length = tensors[0].shape[-1]
    out = []
    for start in range(0, length, READOUT_CHUNK):
        n = min(READOUT_CHUNK, length - start)
        out.append((*(F.pad(t[..., start : start + n], (0, READOUT_CHUNK - n)).contiguous() for t in tensors), n))
    return out


def _cumulative_steps(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, compute: torch.dtype) -> Tensor:
    """(2, b, d, L): each direction's steps summed in its scan order, in sequence order."""
    bias = None if delta_bias is None else delta_bias.to(compute)[:, None]  # (2, 1, d): over the batch
    step = prepare_delta(delta.to(compute), bias, delta_softplus)
    return torch.stack([step[0].cumsum(-1), step[1].flip(-1).cumsum(-1).flip(-1)])


class _Corrections(torch.autograd.Function):
    """(2, b, d, L) in sequence order: what each direction's incoming state h_in (2, b, d, N) adds
    to its outputs, ``y_t += C_t . (exp(A * cumsum(delta))_t * h_in)``, the cumulative sum taken
    in each direction's scan order: the zero-input scan from h_in, in closed form, READOUT_CHUNK
    tokens per kernel call. Keeps only its inputs; the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, delta, A, C, delta_bias, h_in, delta_softplus: bool):  # noqa: ANN001, ANN205, D102
        ctx.save_for_backward(delta, A, C, delta_bias, h_in)
        ctx.delta_softplus = delta_softplus
        compute = h_in.dtype
        cum = _cumulative_steps(delta, delta_bias, delta_softplus, compute)
        A_, C_ = A.to(compute)[:, None], C.to(compute)
        return torch.cat([_readout(0, c, A_, cc, h_in)[..., :n] for c, cc, n in _readout_chunks(cum, C_)], -1)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205, D102
        delta, A, C, delta_bias, h_in = ctx.saved_tensors
        compute = h_in.dtype
        with torch.enable_grad():  # the steps' graph, to take dL/dcum back to delta and its bias
            leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in (delta, delta_bias)]
            cum = _cumulative_steps(leaves[0], leaves[1], ctx.delta_softplus, compute)
        A_, C_ = A.to(compute)[:, None], C.to(compute)
        g_cum, g_C, g_A, g_h = [], [], 0, 0
        # contiguous: the gradient arrives channels-last (from out_proj), for which the compiled
        # kernel is three times slower
        for c, cc, g, n in _readout_chunks(cum.detach(), C_, grad.to(compute).contiguous()):
            gc, ga, gh, gC = _readout(1, c, A_, cc, h_in, g)
            g_cum.append(gc[..., :n])
            g_C.append(gC[..., :n])
            g_A, g_h = g_A + ga, g_h + gh
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(cum, wanted, torch.cat(g_cum, -1)) if wanted else ())
        g_delta, g_bias = (next(grads) if t is not None and t.requires_grad else None for t in leaves)
        return g_delta, g_A.sum(1).to(A.dtype), torch.cat(g_C, -1).to(C.dtype), g_bias, g_h, None


def _recomputed(fn: Callable[..., Tensor], *args: object) -> Tensor:
    """``fn(*args)`` keeping only its inputs for the backward pass, which recomputes it: the
    inputs are kept anyway (by :class:`_Corrections`), the intermediates would be another copy
    of the scan steps."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def cp_bidirectional_selective_scan(
    u: Directions,
    delta: Directions,
    A: Directions,
    B: Directions,
    C: Directions,
    D: Directions | None = None,
    z: Tensor | None = None,
    delta_bias: Directions | None = None,
    delta_softplus: bool = False,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`~dis_dist.ops.selective_scan.bidirectional_selective_scan` on this rank's slice of
    the sequence (same arguments, L = the slice's length; ``group``: the context-parallel ranks,
    in sequence order). Equal to the unsplit scan's outputs on the slice, gradients included.

    The log-decays and the corrections are recomputed in the backward pass rather than kept:
    they add to the saved tensors only the mixer's own inputs."""
    u, delta, A, B, C = (stack_directions(t) for t in (u, delta, A, B, C))
    D, delta_bias = (None if t is None else stack_directions(t) for t in (D, delta_bias))
    rank, k = dist.get_rank(group), dist.get_world_size(group)
    compute = torch.promote_types(u.dtype, torch.float32)
    zero_start, lasts = [], []
    for direction in (0, 1):
        seq = [_in_scan_order(t, direction) for t in (u, delta, B, C)]
        y, last = selective_scan(
            seq[0].to(compute), seq[1], A[direction], seq[2], seq[3], D=None if D is None else D[direction],
            delta_bias=None if delta_bias is None else delta_bias[direction], delta_softplus=delta_softplus,
            return_last_state=True, backend=backend,
        )  # u in the compute dtype: the outputs are rounded once, at the end
        zero_start.append(y.flip(-1) if direction else y)
        lasts.append(last.to(compute))
    log_decays = _recomputed(_log_decays, delta, A, delta_bias, delta_softplus)
    # (k, 2 directions, 2 [state, log-decay], b, d, N): one collective per call
    gathered = all_gather_with_grad(torch.stack([torch.stack(lasts), log_decays], dim=1), group)
    # Scan order: ranks left to right for direction 0, right to left for direction 1.
    h_in = torch.stack([
        incoming_states(gathered[:, 0, 0], gathered[:, 0, 1], rank),
        incoming_states(gathered.flip(0)[:, 1, 0], gathered.flip(0)[:, 1, 1], k - 1 - rank),
    ])
    corrections = _Corrections.apply(delta, A, C, delta_bias, h_in, delta_softplus)
    y = zero_start[0] + zero_start[1] + corrections.sum(0)
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


def slice_bounds(length: int, k: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank ``rank``'s slice of ``length`` tokens over ``k`` ranks: contiguous, in
    rank order, the first ``length % k`` one token longer (as ``torch.tensor_split``)."""
    base, extra = divmod(length, k)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class _GatherSequence(torch.autograd.Function):
    """Every rank's slice (b, l_r, ...) of a sequence, concatenated along dim 1 in rank order; the
    backward returns each rank its own slice of the gradient, not summed: every rank computes
    the same loss from the whole sequence, so each already holds the whole gradient."""

    @staticmethod
    def forward(ctx, t: Tensor, length: int, group: dist.ProcessGroup | None) -> Tensor:  # noqa: D102
        k, rank = dist.get_world_size(group), dist.get_rank(group)
        bounds = [slice_bounds(length, k, r) for r in range(k)]
        ctx.own = bounds[rank]
        longest = bounds[0][1] - bounds[0][0]
        padded = F.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(k)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:, : end - start] for p, (start, end) in zip(parts, bounds)], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        start, end = ctx.own
        return grad[:, start:end], None, None


def gather_sequence(t: Tensor, length: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """(b, length, ...) from every rank's slice ``t`` (b, l_r, ...) of it (see :class:`_GatherSequence`)."""
    return _GatherSequence.apply(t, length, group)
