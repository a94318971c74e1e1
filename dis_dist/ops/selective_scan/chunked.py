"""Sequence-chunked selective scan in plain PyTorch, with a recomputing backward.

The sequence is cut into chunks of T steps (the last one padded with identity steps). A custom autograd
function keeps only its inputs and the states at chunk boundaries (batch x d x N x L/T); its
backward recomputes each chunk's states from the boundary state and runs the reverse recurrence
through the chunk, last chunk first. The scan's activation memory therefore does not grow as
L x N.

The per-chunk work is two small functions with the T steps unrolled over time-major inputs (one
step's slice is contiguous); softplus(delta + bias) and the D skip are folded in. Under
``torch.compile`` (the default where it works: a C++ compiler on CPU, Triton on GPU) each
becomes a few fused loops over the chunk, about 3x faster than the same code run eagerly (which
is what happens without a compiler, with the same results); on the CPU they are compute-bound (a
hand-written C++ kernel ran no faster). Decays exp(delta * A) are formed per step from
delta * A <= 0, so no positive sum is ever exponentiated.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

log = logging.getLogger(__name__)

COMPILE_ENV = "DIS_SCAN_COMPILE"  # "auto" (default), "1" (always), "0" (never)
DEFAULT_CHUNK = {"cpu": 8, "cuda": 16}


def chunk_size_for(length: int, device: torch.device, requested: int | None = None) -> int:
    """T for a sequence: ``requested``, else the device default evened out over the chunks it
    implies (L = 18 with a default of 8 gives three chunks of 6 rather than 8 + 8 + 2 padded)."""
    if requested:
        return requested
    target = DEFAULT_CHUNK.get(device.type, 8)
    num_chunks = -(-length // target)
    return -(-length // num_chunks)


def _delta(delta_raw: Tensor, bias: Tensor, softplus: bool) -> Tensor:
    delta = delta_raw + bias
    return F.softplus(delta) if softplus else delta


def chunk_forward(
    u: Tensor, delta_raw: Tensor, bias: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h: Tensor,
    steps: Tensor, softplus: bool,
) -> tuple[Tensor, Tensor]:
    """Scan one chunk of T steps, time-major: u, delta_raw (T, *S, d); bias, D broadcastable
    to (*S, d); A broadcastable to (*S, d, N); B, C (T, *S, N); h the state before the chunk
    (*S, d, N); ``steps`` (T,) is 1 for real steps and 0 for the padding of a short last chunk
    (delta = 0 there: an identity step). delta = softplus(delta_raw + bias) (or without
    softplus). Returns y (T, *S, d), D * u included, and the state after the chunk."""
    ys = []
    for i in range(u.shape[0]):
        delta = _delta(delta_raw[i], bias, softplus) * steps[i]
        u_i = u[i]
        dA = torch.exp(delta.unsqueeze(-1) * A)
        h = dA * h + (delta * u_i).unsqueeze(-1) * B[i].unsqueeze(-2)
        ys.append((h * C[i].unsqueeze(-2)).sum(-1) + D * u_i)
    return torch.stack(ys), h


def chunk_backward(
    u: Tensor, delta_raw: Tensor, bias: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h: Tensor,
    steps: Tensor, softplus: bool, grad_y: Tensor, carry: Tensor,
) -> tuple[Tensor, ...]:
    """Gradients through one chunk (arguments as :func:`chunk_forward`, plus dL/dy of the chunk
    and ``carry`` = dL/d(state after the chunk)). Returns dL/du, dL/d(delta_raw) (T, *S, d),
    dL/dB, dL/dC (T, *S, N), the chunk's sums of dL/d(bias) (*S, d), dL/dA (*S, d, N) and dL/dD
    (*S, d), unreduced over broadcast axes, and dL/d(state before the chunk)."""
    length = u.shape[0]
    deltas, decays, states = [], [], [h]
    for i in range(length):
        delta = _delta(delta_raw[i], bias, softplus) * steps[i]
        dA = torch.exp(delta.unsqueeze(-1) * A)
        deltas.append(delta)
        decays.append(dA)
        states.append(dA * states[-1] + (delta * u[i]).unsqueeze(-1) * B[i].unsqueeze(-2))
    g = carry
    g_u, g_delta, g_B, g_C = [None] * length, [None] * length, [None] * length, [None] * length
    g_bias = g_A = g_D = None
    for i in range(length - 1, -1, -1):
        gy, u_i, B_i, delta = grad_y[i], u[i], B[i], deltas[i]
        g = g + gy.unsqueeze(-1) * C[i].unsqueeze(-2)  # dL/d(state after step i)
        g_C[i] = (gy.unsqueeze(-1) * states[i + 1]).sum(-2)
        q = g * states[i] * decays[i]  # dL/d(delta * A)
        gBu = (g * B_i.unsqueeze(-2)).sum(-1)  # dL/d(delta * u)
        g_B[i] = (g * (delta * u_i).unsqueeze(-1)).sum(-2)
        g_dt = ((q * A).sum(-1) + gBu * u_i) * steps[i]
        if softplus:
            g_dt = g_dt * torch.sigmoid(delta_raw[i] + bias)
        g_delta[i] = g_dt
        g_u[i] = gBu * delta + gy * D
        terms = (g_dt, q * delta.unsqueeze(-1), gy * u_i)
        if g_bias is None:
            g_bias, g_A, g_D = terms
        else:
            g_bias, g_A, g_D = g_bias + terms[0], g_A + terms[1], g_D + terms[2]
        g = g * decays[i]
    return (
        torch.stack(g_u), torch.stack(g_delta), torch.stack(g_B), torch.stack(g_C),
        g_bias, g_A, g_D, g,
    )


# -- compilation ------------------------------------------------------------------------------

_kernels: dict[str, tuple[Callable, Callable]] = {}
_compile_failed: set[str] = set()


@functools.cache
def _compiler_present(device_type: str) -> bool:
    if device_type == "cpu":
        return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


def _compile_wanted(device: torch.device) -> bool:
    mode = os.environ.get(COMPILE_ENV, "auto")
    if mode == "0" or device.type in _compile_failed:
        return False
    return mode == "1" or _compiler_present(device.type)


def _get_kernels(device: torch.device) -> tuple[Callable, Callable]:
    if not _compile_wanted(device):
        return chunk_forward, chunk_backward
    if device.type not in _kernels:
        # Chunks all have T steps (the last is padded), so a kernel is compiled per layout:
        # static shapes, fastest code. A process that scans several layouts (training and
        # sampling batches, single and bidirectional) needs more than dynamo's default of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _kernels[device.type] = (
            torch.compile(chunk_forward, dynamic=False), torch.compile(chunk_backward, dynamic=False)
        )
        log.info("chunked selective scan: compiling its chunk kernels for %s (once per shape)", device.type)
    return _kernels[device.type]


def _run(which: int, device: torch.device, *args: object) -> tuple[Tensor, ...]:
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

def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The scan computes in its own dtype whatever autocast the caller runs under."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a gradient over the axes along which its input was broadcast."""
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(tuple(range(extra)))
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


def _chunks(length: int, chunk: int, device: torch.device) -> list[tuple[slice, int, Tensor]]:
    """(slice, real steps, step mask) of each chunk; the last one is padded to the full T."""
    ones = torch.ones(chunk, device=device)
    out = []
    for s in range(0, length, chunk):
        n = min(chunk, length - s)
        mask = ones if n == chunk else torch.cat([ones[:n], ones.new_zeros(chunk - n)])
        out.append((slice(s, s + chunk), n, mask))
    return out


def _padded(t: Tensor, n: int, chunk: int) -> Tensor:
    """A chunk's slice of ``n`` real steps, zero-padded to ``chunk`` steps (every call then
    has the same shape: one compiled kernel)."""
    return t if n == chunk else torch.cat([t, t.new_zeros((chunk - n,) + t.shape[1:])])


class _ChunkedScan(torch.autograd.Function):
    """Time-major: u, delta_raw (L, *S, d); bias, D broadcastable to (*S, d); A to (*S, d, N);
    B, C (L, *S, N); h0 (*S, d, N); all in the compute dtype. Returns y (L, *S, d) (D * u
    included) and the last state."""

    @staticmethod
    def forward(ctx, u, delta_raw, bias, A, B, C, D, h0, softplus: bool, chunk: int):  # noqa: D102
        # Detached, the kernels always see requires_grad=False: no recompilation between
        # training and no-grad calls.
        u, delta_raw, bias, A, B, C, D, h0 = (t.detach() for t in (u, delta_raw, bias, A, B, C, D, h0))
        h, ys, bounds = h0, [], []
        with _no_autocast(u.device):
            for sl, n, steps in _chunks(u.shape[0], chunk, u.device):
                bounds.append(h)
                y, h = _run(0, u.device, *(_padded(t[sl], n, chunk) for t in (u, delta_raw)), bias, A,
                            *(_padded(t[sl], n, chunk) for t in (B, C)), D, h, steps, softplus)
                ys.append(y[:n])
        ctx.softplus, ctx.chunk = softplus, chunk
        ctx.save_for_backward(u, delta_raw, bias, A, B, C, D, torch.stack(bounds))
        return torch.cat(ys), h

    @staticmethod
    def backward(ctx, grad_y, grad_last):  # noqa: D102
        u, delta_raw, bias, A, B, C, D, bounds = (t.detach() for t in ctx.saved_tensors)
        chunk = ctx.chunk
        grad_y = grad_y.contiguous() if grad_y is not None else torch.zeros_like(u)
        carry = grad_last.contiguous() if grad_last is not None else torch.zeros_like(bounds[0])
        parts: list[tuple[Tensor, ...]] = []
        sums: list[Tensor] = []
        with _no_autocast(u.device):
            chunks = _chunks(u.shape[0], chunk, u.device)
            for c in reversed(range(len(chunks))):
                sl, n, steps = chunks[c]
                pad = [_padded(t[sl], n, chunk) for t in (u, delta_raw, B, C, grad_y)]
                *per_step, g_bias, g_A, g_D, carry = _run(
                    1, u.device, pad[0], pad[1], bias, A, pad[2], pad[3], D, bounds[c], steps,
                    ctx.softplus, pad[4], carry,
                )
                parts.append(tuple(p[:n] for p in per_step))
                sums = [g_bias, g_A, g_D] if not sums else [a + b for a, b in zip(sums, (g_bias, g_A, g_D))]
        g_u, g_delta, g_B, g_C = (torch.cat(p[::-1]) for p in zip(*parts))
        g_bias, g_A, g_D = (_reduce_to(g, t.shape) for g, t in zip(sums, (bias, A, D)))
        return g_u, g_delta, g_bias, g_A, g_B, g_C, g_D, carry, None, None


def _time_major(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(..., L) -> contiguous (L, ...)."""
    return t.to(dtype).movedim(-1, 0).contiguous()


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
    ``chunk_size`` is T (default: :func:`chunk_size_for`)."""
    dtype_in = u.dtype
    compute = torch.promote_types(dtype_in, torch.float32)
    batch, dim, _ = u.shape

    def prep(t: Tensor | None, *shape: int) -> Tensor:
        return t.to(compute) if t is not None else u.new_zeros(shape, dtype=compute)

    y, last = _ChunkedScan.apply(
        _time_major(u, compute), _time_major(delta, compute), prep(delta_bias, dim), A.to(compute),
        _time_major(B, compute), _time_major(C, compute), prep(D, dim),
        prep(initial_state, batch, dim, A.shape[-1]), delta_softplus,
        chunk_size_for(u.shape[-1], u.device, chunk_size),
    )
    y = y.movedim(0, -1)
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
    over a leading axis of 2; each (2, b, ., L) input is copied once into the time-major layout,
    direction 1 reversed on the way, which is cheap next to the (b, d, N, L) work of the scan."""
    dtype_in = u.dtype
    compute = torch.promote_types(dtype_in, torch.float32)
    _, batch, dim, _ = u.shape

    def time_major_in_scan_order(t: Tensor) -> Tensor:  # (2, b, k, L) -> (L, 2, b, k)
        t = t.to(compute)
        return torch.stack([rearrange(t[0], "b k l -> l b k"), rearrange(t[1].flip(-1), "b k l -> l b k")], dim=1)

    def per_direction(t: Tensor | None) -> Tensor:  # (2, d) -> (2, 1, d): broadcast over the batch
        return (t.to(compute) if t is not None else u.new_zeros(2, dim, dtype=compute))[:, None]

    y, _ = _ChunkedScan.apply(
        time_major_in_scan_order(u), time_major_in_scan_order(delta), per_direction(delta_bias),
        A.to(compute)[:, None], time_major_in_scan_order(B), time_major_in_scan_order(C), per_direction(D),
        u.new_zeros(2, batch, dim, A.shape[-1], dtype=compute), delta_softplus,
        chunk_size_for(u.shape[-1], u.device, chunk_size),
    )
    y = rearrange(y[:, 0] + y[:, 1].flip(0), "l b d -> b d l")
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)
