"""Selective scan as Triton kernels: the chunked algorithm on a GPU, forward and backward.

One program scans one row (a batch element of one direction) for a block of channels, the
[BLOCK_D, N] state in registers and in fp32 whatever the input dtype. The forward pass writes
the outputs and the states at chunk boundaries (the only thing kept for backward besides the
inputs). The backward pass walks the chunks last to first: it recomputes a chunk's states into
a small scratch buffer from the boundary state, then runs the reverse recurrence through it.
Cross-channel sums (dB, dC) are written per channel block and summed afterwards, so results do
not depend on atomics' ordering.

Rows of the second direction of a bidirectional scan run right to left by indexing time
backwards: no reversed copies of the inputs. Runs on CPU tensors under ``TRITON_INTERPRET=1``
(how the tests check it without a GPU).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_CHUNK = 32


def unavailable(device: torch.device) -> str | None:
    """Why this backend cannot run on ``device`` (None when it can)."""
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests)"


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _time_index(t, length, reverse):
    return tl.where(reverse, length - 1 - t, t)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, h0_ptr,
    y_ptr, bounds_ptr, last_ptr,
    rows_per_dir, dim, length, num_chunks,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, N: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, BIDIRECTIONAL: tl.constexpr,
):
    row = tl.program_id(0)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, N)
    d_mask = d_offs < dim
    tile_mask = d_mask[:, None] & (n_offs[None, :] < N)
    direction = row // rows_per_dir
    reverse = BIDIRECTIONAL & (direction == 1)
    A = tl.load(A_ptr + direction * dim * N + d_offs[:, None] * N + n_offs[None, :], mask=tile_mask, other=0.0)
    Dv = tl.load(D_ptr + direction * dim + d_offs, mask=d_mask, other=0.0)
    bias = tl.load(bias_ptr + direction * dim + d_offs, mask=d_mask, other=0.0)
    state_offs = row * dim * N + d_offs[:, None] * N + n_offs[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=tile_mask, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, N], dtype=tl.float32)
    seq = row * dim * length + d_offs * length
    seq_n = row * N * length + n_offs * length
    for c in range(num_chunks):
        tl.store(bounds_ptr + (row * num_chunks + c) * dim * N + d_offs[:, None] * N + n_offs[None, :], h,
                 mask=tile_mask)
        for i in range(CHUNK):
            t = c * CHUNK + i
            ti = _time_index(t, length, reverse)
            md = d_mask & (d_offs * 0 + t < length)  # vector masks (the interpreter wants them so)
            mn = n_offs * 0 + t < length
            dt = tl.load(delta_ptr + seq + ti, mask=md, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(md, dt, 0.0)
            u = tl.load(u_ptr + seq + ti, mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + seq_n + ti, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + seq_n + ti, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
            tl.store(y_ptr + seq + ti, y.to(y_ptr.dtype.element_ty), mask=md)
    tl.store(last_ptr + state_offs, h, mask=tile_mask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, bounds_ptr, grad_y_ptr, grad_last_ptr,
    scratch_ptr,
    g_u_ptr, g_delta_ptr, g_B_ptr, g_C_ptr, g_A_ptr, g_D_ptr, g_bias_ptr, g_h0_ptr,
    rows_per_dir, dim, length, num_chunks, num_dblocks,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, N: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_GRAD_LAST: tl.constexpr, BIDIRECTIONAL: tl.constexpr,
):
    row = tl.program_id(0)
    dblock = tl.program_id(1)
    d_offs = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, N)
    d_mask = d_offs < dim
    tile_mask = d_mask[:, None] & (n_offs[None, :] < N)
    direction = row // rows_per_dir
    reverse = BIDIRECTIONAL & (direction == 1)
    A = tl.load(A_ptr + direction * dim * N + d_offs[:, None] * N + n_offs[None, :], mask=tile_mask, other=0.0)
    Dv = tl.load(D_ptr + direction * dim + d_offs, mask=d_mask, other=0.0)
    bias = tl.load(bias_ptr + direction * dim + d_offs, mask=d_mask, other=0.0)
    state_offs = row * dim * N + d_offs[:, None] * N + n_offs[None, :]
    tile_offs = d_offs[:, None] * N + n_offs[None, :]
    if HAS_GRAD_LAST:
        g = tl.load(grad_last_ptr + state_offs, mask=tile_mask, other=0.0)
    else:
        g = tl.zeros([BLOCK_D, N], dtype=tl.float32)
    g_A = tl.zeros([BLOCK_D, N], dtype=tl.float32)
    g_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    g_D = tl.zeros([BLOCK_D], dtype=tl.float32)
    seq = row * dim * length + d_offs * length
    seq_n = row * N * length + n_offs * length
    partial_n = (row * num_dblocks + dblock) * N * length + n_offs * length
    scratch = scratch_ptr + (row * num_dblocks + dblock) * (CHUNK + 1) * BLOCK_D * N
    local = tl.arange(0, BLOCK_D)[:, None] * N + n_offs[None, :]
    for cc in range(num_chunks):
        c = num_chunks - 1 - cc
        # Recompute the chunk: slot 0 holds the state before it, slot i + 1 the state after step i.
        h = tl.load(bounds_ptr + (row * num_chunks + c) * dim * N + tile_offs, mask=tile_mask, other=0.0)
        tl.store(scratch + local, h)
        for i in range(CHUNK):
            t = c * CHUNK + i
            ti = _time_index(t, length, reverse)
            md = d_mask & (d_offs * 0 + t < length)  # vector masks (the interpreter wants them so)
            mn = n_offs * 0 + t < length
            dt = tl.load(delta_ptr + seq + ti, mask=md, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(md, dt, 0.0)
            u = tl.load(u_ptr + seq + ti, mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + seq_n + ti, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (i + 1) * BLOCK_D * N + local, h)
        # Reverse recurrence through the chunk.
        for ii in range(CHUNK):
            i = CHUNK - 1 - ii
            t = c * CHUNK + i
            ti = _time_index(t, length, reverse)
            md = d_mask & (d_offs * 0 + t < length)  # vector masks (the interpreter wants them so)
            mn = n_offs * 0 + t < length
            raw = tl.load(delta_ptr + seq + ti, mask=md, other=0.0).to(tl.float32) + bias
            dt = raw
            if SOFTPLUS:
                dt = _softplus(raw)
            dt = tl.where(md, dt, 0.0)
            u = tl.load(u_ptr + seq + ti, mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + seq_n + ti, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + seq_n + ti, mask=mn, other=0.0).to(tl.float32)
            gy = tl.load(grad_y_ptr + seq + ti, mask=md, other=0.0).to(tl.float32)
            h_t = tl.load(scratch + (i + 1) * BLOCK_D * N + local)
            h_prev = tl.load(scratch + i * BLOCK_D * N + local)
            dA = tl.exp(dt[:, None] * A)
            g = g + gy[:, None] * Ct[None, :]
            tl.store(g_C_ptr + partial_n + ti, tl.sum(tl.where(tile_mask, gy[:, None] * h_t, 0.0), axis=0),
                     mask=mn)
            q = g * h_prev * dA
            g_A += q * dt[:, None]
            gBu = tl.sum(g * Bt[None, :], axis=1)
            tl.store(g_B_ptr + partial_n + ti,
                     tl.sum(tl.where(tile_mask, g * (dt * u)[:, None], 0.0), axis=0), mask=mn)
            g_dt = tl.sum(q * A, axis=1) + gBu * u
            if SOFTPLUS:
                g_dt = g_dt * tl.sigmoid(raw)
            g_dt = tl.where(md, g_dt, 0.0)
            tl.store(g_delta_ptr + seq + ti, g_dt, mask=md)
            tl.store(g_u_ptr + seq + ti, gBu * dt + gy * Dv, mask=md)
            g_bias += g_dt
            g_D += gy * u
            g = g * dA
    tl.store(g_h0_ptr + state_offs, g, mask=tile_mask)
    tl.store(g_A_ptr + state_offs, g_A, mask=tile_mask)
    tl.store(g_D_ptr + row * dim + d_offs, g_D, mask=d_mask)
    tl.store(g_bias_ptr + row * dim + d_offs, g_bias, mask=d_mask)


def _block_d(dim: int, device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter: small blocks keep the tests quick
        return min(16, triton.next_power_of_2(dim))
    return min(64, triton.next_power_of_2(dim))


class _TritonScan(torch.autograd.Function):
    """Rows-major: u, delta (R, d, L); A (G, d, N) fp32; B, C (R, N, L); D, bias (G, d) fp32;
    h0 (R, d, N) or None; R = G x rows_per_dir. Returns y (R, d, L) in u's dtype, last state fp32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, bias, h0, softplus: bool, chunk: int, bidirectional: bool):  # noqa: D102
        rows, dim, length = u.shape
        groups, _, n = A.shape
        num_chunks = triton.cdiv(length, chunk)
        block_d = _block_d(dim, u.device)
        y = torch.empty_like(u)
        bounds = torch.empty(rows, num_chunks, dim, n, device=u.device, dtype=torch.float32)
        last = torch.empty(rows, dim, n, device=u.device, dtype=torch.float32)
        grid = (rows, triton.cdiv(dim, block_d))
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, D, bias, h0 if h0 is not None else last, y, bounds, last,
            rows // groups, dim, length, num_chunks,
            CHUNK=chunk, BLOCK_D=block_d, N=n, SOFTPLUS=softplus, HAS_H0=h0 is not None,
            BIDIRECTIONAL=bidirectional,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, bias, bounds)
        ctx.config = (softplus, chunk, bidirectional, block_d, h0 is not None)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):  # noqa: D102
        u, delta, A, B, C, D, bias, bounds = ctx.saved_tensors
        softplus, chunk, bidirectional, block_d, has_h0 = ctx.config
        rows, dim, length = u.shape
        groups, _, n = A.shape
        num_chunks = bounds.shape[1]
        num_dblocks = triton.cdiv(dim, block_d)
        f32 = dict(device=u.device, dtype=torch.float32)
        grad_y = grad_y.contiguous() if grad_y is not None else torch.zeros_like(u)
        g_u, g_delta = torch.empty(rows, dim, length, **f32), torch.empty(rows, dim, length, **f32)
        g_B = torch.zeros(rows, num_dblocks, n, length, **f32)
        g_C = torch.zeros(rows, num_dblocks, n, length, **f32)
        g_A, g_h0 = torch.empty(rows, dim, n, **f32), torch.empty(rows, dim, n, **f32)
        g_D, g_bias = torch.empty(rows, dim, **f32), torch.empty(rows, dim, **f32)
        scratch = torch.empty(rows * num_dblocks * (chunk + 1) * block_d * n, **f32)
        _scan_bwd_kernel[(rows, num_dblocks)](
            u, delta, A, B, C, D, bias, bounds, grad_y,
            grad_last.contiguous() if grad_last is not None else g_h0, scratch,
            g_u, g_delta, g_B, g_C, g_A, g_D, g_bias, g_h0,
            rows // groups, dim, length, num_chunks, num_dblocks,
            CHUNK=chunk, BLOCK_D=block_d, N=n, SOFTPLUS=softplus, HAS_GRAD_LAST=grad_last is not None,
            BIDIRECTIONAL=bidirectional,
        )

        def per_group(t: Tensor) -> Tensor:  # (R, ...) -> summed over each group's rows: (G, ...)
            return t.view(groups, rows // groups, *t.shape[1:]).sum(1)

        return (
            g_u.to(u.dtype), g_delta.to(delta.dtype), per_group(g_A), g_B.sum(1).to(B.dtype),
            g_C.sum(1).to(C.dtype), per_group(g_D), per_group(g_bias), g_h0 if has_h0 else None,
            None, None, None,
        )


def _check(A: Tensor) -> None:
    n = A.shape[-1]
    if n & (n - 1):
        from dis_dist.errors import BackendError

        raise BackendError(f"the triton selective scan needs d_state to be a power of two, got {n}")


def _params(t: Tensor | None, groups: int, dim: int, like: Tensor) -> Tensor:
    if t is None:
        return torch.zeros(groups, dim, device=like.device, dtype=torch.float32)
    return t.float().reshape(groups, dim).contiguous()


def selective_scan_triton(
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
    """Same contract as :func:`~dis_dist.ops.selective_scan.reference.selective_scan_ref`."""
    _check(A)
    _, dim, _ = u.shape
    y, last = _TritonScan.apply(
        u.contiguous(), delta.contiguous(), A.float()[None].contiguous(), B.contiguous(), C.contiguous(),
        _params(D, 1, dim, u), _params(delta_bias, 1, dim, u),
        None if initial_state is None else initial_state.float().contiguous(), delta_softplus,
        chunk_size or DEFAULT_CHUNK, False,
    )
    if z is not None:
        y = (y.float() * F.silu(z.float())).to(u.dtype)
    return (y, last) if return_last_state else y


def bidirectional_selective_scan_triton(
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
    """Same contract as the reference's bidirectional scan; direction 1 indexes time backwards."""
    _check(A)
    _, batch, dim, length = u.shape

    def rows(t: Tensor) -> Tensor:
        return t.reshape(2 * batch, *t.shape[2:]).contiguous()

    y, _ = _TritonScan.apply(
        rows(u), rows(delta), A.float().contiguous(), rows(B), rows(C),
        _params(D, 2, dim, u), _params(delta_bias, 2, dim, u), None, delta_softplus,
        chunk_size or DEFAULT_CHUNK, True,
    )
    y = y.view(2, batch, dim, length).float().sum(0)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)
