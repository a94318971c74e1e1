"""Sequence-chunked selective scan in plain PyTorch, with a recomputing backward.

The sequence is cut into chunks of T steps (padded to a multiple of T with identity steps:
delta = 0, so the decay is 1 and the input 0). A custom autograd function keeps only its
inputs and the states at chunk boundaries (batch x d x N x L/T); its backward recomputes each
chunk's states from the boundary state and runs the reverse recurrence through the chunk, last
chunk first. The scan's activation memory therefore does not grow as L x N.

The per-chunk work is two small functions with the T steps unrolled. Under ``torch.compile``
(the default where it works: a C++ compiler on CPU, Triton on GPU) each becomes a few fused
kernels that keep the state in registers, which is what makes this backend fast; without it
they run eagerly with the same results. Decays exp(delta * A) are formed per step from
delta * A <= 0, so no positive sum is ever exponentiated.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

COMPILE_ENV = "DIS_SCAN_COMPILE"  # "auto" (default), "1" (always), "0" (never)
DEFAULT_CHUNK = {"cpu": 4, "cuda": 16}


def default_chunk(device: torch.device) -> int:
    return DEFAULT_CHUNK.get(device.type, 8)


def chunk_forward(
    delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor
) -> tuple[Tensor, Tensor]:
    """Scan one chunk. delta, du (= delta * u): (T, *S, d); A broadcastable to (*S, d, N);
    B, C: (T, *S, N); h: the state before the chunk (*S, d, N). Returns y (T, *S, d) and the
    state after the chunk."""
    ys = []
    for i in range(delta.shape[0]):
        h = torch.exp(delta[i].unsqueeze(-1) * A) * h + du[i].unsqueeze(-1) * B[i].unsqueeze(-2)
        ys.append((h * C[i].unsqueeze(-2)).sum(-1))
    return torch.stack(ys), h


def chunk_backward(
    delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor, grad_y: Tensor, carry: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients through one chunk (arguments as :func:`chunk_forward`, plus dL/dy of the chunk
    and ``carry`` = dL/d(state after the chunk)). Returns dL/d(delta) through the decay,
    dL/d(du), dL/dA summed over the chunk (unreduced over broadcast axes), dL/dB, dL/dC and
    dL/d(state before the chunk)."""
    steps = delta.shape[0]
    decays, states = [], [h]
    for i in range(steps):
        dA = torch.exp(delta[i].unsqueeze(-1) * A)
        decays.append(dA)
        states.append(dA * states[-1] + du[i].unsqueeze(-1) * B[i].unsqueeze(-2))
    g = carry
    grad_A = None
    g_delta, g_du, g_B, g_C = [None] * steps, [None] * steps, [None] * steps, [None] * steps
    for i in range(steps - 1, -1, -1):
        g = g + grad_y[i].unsqueeze(-1) * C[i].unsqueeze(-2)  # dL/d(state after step i)
        g_C[i] = (grad_y[i].unsqueeze(-1) * states[i + 1]).sum(-2)
        q = g * states[i] * decays[i]  # dL/d(delta * A) at step i
        term = q * delta[i].unsqueeze(-1)
        grad_A = term if grad_A is None else grad_A + term
        g_delta[i] = (q * A).sum(-1)
        g_du[i] = (g * B[i].unsqueeze(-2)).sum(-1)
        g_B[i] = (g * du[i].unsqueeze(-1)).sum(-2)
        g = g * decays[i]
    return (
        torch.stack(g_delta), torch.stack(g_du), grad_A, torch.stack(g_B), torch.stack(g_C), g
    )


# -- compilation ------------------------------------------------------------------------------

_kernels: dict[str, tuple[Callable, Callable]] = {}
_compile_failed: set[str] = set()


def _compile_wanted(device: torch.device) -> bool:
    mode = os.environ.get(COMPILE_ENV, "auto")
    if mode == "0" or device.type in _compile_failed:
        return False
    if mode == "1":
        return True
    if device.type == "cpu":
        return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def _get_kernels(device: torch.device) -> tuple[Callable, Callable]:
    if not _compile_wanted(device):
        return chunk_forward, chunk_backward
    if device.type not in _kernels:
        _kernels[device.type] = (torch.compile(chunk_forward), torch.compile(chunk_backward))
        log.info("chunked selective scan: compiling its chunk kernels for %s (once per shape)", device.type)
    return _kernels[device.type]


def _run(which: int, device: torch.device, *args: Tensor) -> tuple[Tensor, ...]:
    """Call the compiled kernel, falling back to eager (with one warning) if compilation fails."""
    kernel = _get_kernels(device)[which]
    try:
        return kernel(*args)
    except Exception as e:  # compiler missing or broken: the eager kernel computes the same
        if kernel in (chunk_forward, chunk_backward):
            raise
        _compile_failed.add(device.type)
        log.warning("torch.compile of the chunked scan failed on %s (%s); running it eagerly", device.type, e)
        return (chunk_forward, chunk_backward)[which](*args)


# -- the autograd function --------------------------------------------------------------------

def _pad_time(t: Tensor, pad: int) -> Tensor:
    return torch.cat([t, t.new_zeros((pad,) + t.shape[1:])]) if pad else t


class _ChunkedScan(torch.autograd.Function):
    """Time-major core: u, delta (L, *S, d); A broadcastable to (*S, d, N); B, C (L, *S, N);
    h0 (*S, d, N), all in the compute dtype. Returns y (L, *S, d) and the last state."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk: int):  # noqa: D102 (autograd signature)
        length = u.shape[0]
        pad = (-length) % chunk
        delta_p, du_p = _pad_time(delta, pad), _pad_time(delta * u, pad)
        B_p, C_p = _pad_time(B, pad), _pad_time(C, pad)
        h, ys, bounds = h0, [], []
        with torch.autocast(u.device.type, enabled=False):
            for s in range(0, length + pad, chunk):
                bounds.append(h)
                sl = slice(s, s + chunk)
                y, h = _run(0, u.device, delta_p[sl], du_p[sl], A, B_p[sl], C_p[sl], h)
                ys.append(y)
        ctx.chunk = chunk
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(bounds))
        return torch.cat(ys)[:length], h

    @staticmethod
    def backward(ctx, grad_y, grad_last):  # noqa: D102
        u, delta, A, B, C, bounds = ctx.saved_tensors
        chunk, length = ctx.chunk, u.shape[0]
        pad = (-length) % chunk
        delta_p, du_p = _pad_time(delta, pad), _pad_time(delta * u, pad)
        B_p, C_p = _pad_time(B, pad), _pad_time(C, pad)
        grad_y = _pad_time(grad_y if grad_y is not None else torch.zeros_like(u), pad)
        carry = grad_last if grad_last is not None else torch.zeros_like(bounds[0])
        parts: list[tuple[Tensor, ...]] = []
        grad_A = None
        with torch.autocast(u.device.type, enabled=False):
            for c in reversed(range(bounds.shape[0])):
                sl = slice(c * chunk, (c + 1) * chunk)
                g_delta, g_du, g_A, g_B, g_C, carry = _run(
                    1, u.device, delta_p[sl], du_p[sl], A, B_p[sl], C_p[sl], bounds[c], grad_y[sl], carry
                )
                parts.append((g_delta, g_du, g_B, g_C))
                grad_A = g_A if grad_A is None else grad_A + g_A
        g_delta, g_du, g_B, g_C = (torch.cat(p[::-1])[:length] for p in zip(*parts))
        grad_u = g_du * delta
        grad_delta = g_delta + g_du * u
        return grad_u, grad_delta, _reduce_to(grad_A, A.shape), g_B, g_C, carry, None


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a gradient over the axes along which its input was broadcast."""
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(tuple(range(extra)))
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


def _scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """(..., d, L) layout in and out; all arguments already in the compute dtype."""

    def time_major(t: Tensor) -> Tensor:
        return t.movedim(-1, 0).contiguous()

    y, last = _ChunkedScan.apply(
        time_major(u), time_major(delta), A, time_major(B), time_major(C), h0, chunk
    )
    return y.movedim(0, -1), last


def selective_scan_chunked(
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
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as :func:`~dis_dist.ops.selective_scan.reference.selective_scan_ref`;
    ``chunk_size`` is T (default per device: :data:`DEFAULT_CHUNK`)."""
    dtype_in = u.dtype
    compute = torch.promote_types(dtype_in, torch.float32)
    chunk = chunk_size or default_chunk(u.device)
    u_c, delta_c = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    batch, dim, _ = u.shape
    h0 = initial_state if initial_state is not None else u_c.new_zeros(batch, dim, A.shape[-1])
    y, last = _scan(u_c, delta_c, A.to(compute), B.to(compute), C.to(compute), h0.to(compute), chunk)
    if D is not None:
        y = y + u_c * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(dtype_in)
    return (out, last) if return_last_state else out


def bidirectional_selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Same contract as the reference's bidirectional scan. Both directions run as one scan
    (a leading axis of 2); direction 1's (b, d, L)-sized inputs are reversed into its scan
    order, which is cheap next to the (b, d, N, L) work of the scan itself."""
    dtype_in = u.dtype
    compute = torch.promote_types(dtype_in, torch.float32)
    chunk = chunk_size or default_chunk(u.device)

    def in_scan_order(t: Tensor) -> Tensor:
        t = t.to(compute)
        return torch.stack([t[0], t[1].flip(-1)])

    u_c, delta_c = in_scan_order(u), in_scan_order(delta)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None, :, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    h0 = u_c.new_zeros(*u_c.shape[:3], A.shape[-1])
    y, _ = _scan(u_c, delta_c, A.to(compute)[:, None], in_scan_order(B), in_scan_order(C), h0, chunk)
    if D is not None:
        y = y + u_c * D.to(compute)[:, None, :, None]
    y = y[0] + y[1].flip(-1)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)
