"""Selective scan as Triton kernels built for throughput: tiles of T steps, time-parallel inside.

One program owns one batch element and a block of BD channels, and walks the sequence in tiles
of T steps. A tile's inputs arrive in one 2-D load each ([T, BD] of u and delta, [T, N] of B and
C), read in place through their strides: the channels-last views the mixer's projections write
need no copies, and the direction pairs need no stacking. Inside a tile the recurrence
h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t is an associative scan over the [T, BD, N] tile in
registers (the pairs (decay, input) compose as (a1 a2, b1 a2 + b2)); the state entering the tile
is added afterwards, scaled by the cumulative decays. The state stays fp32 whatever the inputs.

Both directions of the bidirectional scan run in one program, one after the other: direction 1
(right to left) first, its outputs kept in the output buffer; then direction 0 adds its own,
applies the z gate and writes the gated sum. softplus, the dt bias, D, the gate and the direction
sum are fused; the ungated sum is kept for the gate's gradient.

The backward pass walks each direction's tiles in reverse scan order. It recomputes a tile's
states in registers from the state saved at the tile's start, then runs the adjoint recurrence
G_t = gy_t C_t + exp(dt_{t+1} A) G_{t+1} as a second (reversed) scan over the tile. The previous
states and the next steps' decays are the tiles shifted by one row (``tl.gather``), so each decay
is computed once, and exp(dt_t A) h_{t-1} is a product (mamba-ssm's h_t - dt_t u_t B_t loses
all its digits where the decays are strong). Sums over channels (dB, dC) are reduced inside the program and written
per channel block, sums over the batch (dA, dD, the dt bias) per batch element; both are summed
afterwards in a fixed order, so the results do not depend on scheduling (no atomics).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check it without a GPU). The tile
shape (T, BD) and the warps per program can be set with ``DIS_SCAN_TILE=T,BD,WARPS`` (powers of
two) to tune on a GPU; the state size N must be a power of two too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from dis_dist.errors import BackendError

LOG2E = 1.4426950408889634
GPU_TILE = (16, 32, 8)  # T, BD, warps: 16 x 32 x 16 fp32 per [T, BD, N] tile
INTERPRETER_TILE = (8, 8, 1)  # small tiles keep the interpreted tests quick
_empty = torch.empty  # tests swap in a NaN-filled allocator to check that every output is written


def unavailable(device: torch.device) -> str | None:
    """Why this backend cannot run on ``device`` (None when it can)."""
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests)"


def tile_config(device: torch.device, tile: int | None = None, block_d: int | None = None) -> tuple[int, int, int]:
    """(T, BD, warps): arguments, then ``DIS_SCAN_TILE``, then the device's default."""
    default = GPU_TILE if device.type == "cuda" else INTERPRETER_TILE
    env = os.environ.get("DIS_SCAN_TILE")
    if env:
        try:
            default = tuple(int(v) for v in env.split(","))
            assert len(default) == 3
        except (ValueError, AssertionError):
            raise BackendError(f"DIS_SCAN_TILE={env!r}: expected T,BD,WARPS, e.g. 16,32,8") from None
    config = (tile or default[0], block_d or default[1], default[2])
    if any(v < 1 or v & (v - 1) for v in config):
        raise BackendError(f"the tiled scan's T, BD and warps must be powers of two, got {config}")
    return config


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _row(x, i, T: tl.constexpr):
    """Row ``i`` of a [T, ...] tile (a masked sum: registers cannot be indexed)."""
    return tl.sum(tl.where((tl.arange(0, T) == i)[:, None, None], x, 0.0), axis=0)


@triton.jit
def _load_td(ptr, t, d, s_l, s_d, mask):
    return tl.load(ptr + t[:, None] * s_l + d[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_tn(ptr, t, n, s_l, s_n, tmask):
    return tl.load(ptr + t[:, None] * s_l + n[None, :] * s_n, mask=tmask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _step(dl_ptr, t, d, s_l, s_d, mask, bias, SOFTPLUS: tl.constexpr):
    """(dt, raw): softplus(delta + bias) (0 outside ``mask``) and its argument."""
    raw = _load_td(dl_ptr, t, d, s_l, s_d, mask) + bias[None, :]
    dt = raw
    if SOFTPLUS:
        dt = tl.where(raw <= 20.0, tl.log2(1.0 + tl.exp2(raw * 1.4426950408889634)) * 0.6931471805599453, raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _fwd_pass(
    u_ptr, dl_ptr, B_ptr, C_ptr, z_ptr, ypre_ptr, out_ptr, bounds_ptr,
    h, A2, Dv, bias, d, dmask, length, n_tiles,
    su_l, su_d, sdl_l, sdl_d, sB_l, sB_n, sz_l, sz_d, sy_l, sy_d,
    T: tl.constexpr, BD: tl.constexpr, N: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    ADD_PREVIOUS: tl.constexpr, STORE_YPRE: tl.constexpr, STORE_OUT: tl.constexpr, HAS_Z: tl.constexpr,
    SAVE: tl.constexpr,
):
    """One direction over the whole sequence from state ``h``; returns the final state."""
    n = tl.arange(0, N)
    for k in range(n_tiles):
        if REVERSE:
            tile = n_tiles - 1 - k
        else:
            tile = k
        t = tile * T + tl.arange(0, T)
        tmask = t < length
        mask = tmask[:, None] & dmask[None, :]
        if SAVE:  # the state entering the tile, for the backward pass
            tl.store(bounds_ptr + tile * BD * N + tl.arange(0, BD)[:, None] * N + n[None, :], h)
        u = _load_td(u_ptr, t, d, su_l, su_d, mask)
        dt, _ = _step(dl_ptr, t, d, sdl_l, sdl_d, mask, bias, SOFTPLUS)
        Bt = _load_tn(B_ptr, t, n, sB_l, sB_n, tmask)
        Ct = _load_tn(C_ptr, t, n, sB_l, sB_n, tmask)
        decay = tl.exp2(dt[:, :, None] * A2[None, :, :])
        cA, cB = tl.associative_scan((decay, (dt * u)[:, :, None] * Bt[:, None, :]), 0, _combine, reverse=REVERSE)
        hs = cA * h[None, :, :] + cB
        y = tl.sum(hs * Ct[:, None, :], axis=2) + Dv[None, :] * u
        if REVERSE:
            h = _row(hs, 0, T)
        else:
            h = _row(hs, T - 1, T)
        y_offs = t[:, None] * sy_l + d[None, :] * sy_d
        if ADD_PREVIOUS:
            y += tl.load(ypre_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
        if STORE_YPRE:
            tl.store(ypre_ptr + y_offs, y.to(ypre_ptr.dtype.element_ty), mask=mask)
        if STORE_OUT:
            if HAS_Z:
                z = _load_td(z_ptr, t, d, sz_l, sz_d, mask)
                y = y * z * tl.sigmoid(z)
            tl.store(out_ptr + y_offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    return h


@triton.jit
def _fwd_kernel(
    u0_ptr, u1_ptr, dl0_ptr, dl1_ptr, B0_ptr, B1_ptr, C0_ptr, C1_ptr, z_ptr, A_ptr, D_ptr, bias_ptr, h0_ptr,
    ypre_ptr, out_ptr, bounds_ptr, last_ptr,
    batch, dim, length, n_tiles,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sB_b, sB_n, sB_l, sz_b, sz_d, sz_l, sy_b, sy_d, sy_l,
    T: tl.constexpr, BD: tl.constexpr, N: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, BIDIRECTIONAL: tl.constexpr,
    SAVE: tl.constexpr,
):
    pid_d, b = tl.program_id(0), tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, N)
    dmask = d < dim
    dn = d[:, None] * N + n[None, :]
    dn_mask = dmask[:, None] & (n[None, :] < N)
    n_dblocks = tl.num_programs(0)
    # bounds: (ndir, batch, n_dblocks, n_tiles, BD, N), this program's slice contiguous
    tile_stride = n_tiles * BD * N
    y_base = b * sy_b
    if BIDIRECTIONAL:
        h = tl.zeros([BD, N], dtype=tl.float32)
        A2 = tl.load(A_ptr + dim * N + dn, mask=dn_mask, other=0.0) * 1.4426950408889634
        Dv = tl.load(D_ptr + dim + d, mask=dmask, other=0.0)
        bias = tl.load(bias_ptr + dim + d, mask=dmask, other=0.0)
        _fwd_pass(
            u1_ptr + b * su_b, dl1_ptr + b * sdl_b, B1_ptr + b * sB_b, C1_ptr + b * sB_b, z_ptr + b * sz_b,
            ypre_ptr + y_base, out_ptr + y_base, bounds_ptr + ((batch + b) * n_dblocks + pid_d) * tile_stride,
            h, A2, Dv, bias, d, dmask, length, n_tiles,
            su_l, su_d, sdl_l, sdl_d, sB_l, sB_n, sz_l, sz_d, sy_l, sy_d,
            T, BD, N, SOFTPLUS, True, False, True, False, False, SAVE,
        )
    if HAS_H0:
        h = tl.load(h0_ptr + b * dim * N + dn, mask=dn_mask, other=0.0)
    else:
        h = tl.zeros([BD, N], dtype=tl.float32)
    A2 = tl.load(A_ptr + dn, mask=dn_mask, other=0.0) * 1.4426950408889634
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0)
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    h = _fwd_pass(
        u0_ptr + b * su_b, dl0_ptr + b * sdl_b, B0_ptr + b * sB_b, C0_ptr + b * sB_b, z_ptr + b * sz_b,
        ypre_ptr + y_base, out_ptr + y_base, bounds_ptr + (b * n_dblocks + pid_d) * tile_stride,
        h, A2, Dv, bias, d, dmask, length, n_tiles,
        su_l, su_d, sdl_l, sdl_d, sB_l, sB_n, sz_l, sz_d, sy_l, sy_d,
        T, BD, N, SOFTPLUS, False, BIDIRECTIONAL, HAS_Z and SAVE, True, HAS_Z, SAVE,
    )
    if not BIDIRECTIONAL:
        tl.store(last_ptr + b * dim * N + dn, h, mask=dn_mask)


@triton.jit
def _bwd_pass(
    u_ptr, dl_ptr, B_ptr, C_ptr, z_ptr, ypre_ptr, gout_ptr, bounds_ptr,
    du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    G, A_nat, Dv, bias, d, dmask, length, n_tiles,
    su_l, su_d, sdl_l, sdl_d, sB_l, sB_n, sz_l, sz_d, sy_l, sy_d, sg_l, sg_d, sdz_l, sdz_d,
    T: tl.constexpr, BD: tl.constexpr, N: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_Z: tl.constexpr, WRITE_DZ: tl.constexpr,
):
    """One direction's gradients, tiles in reverse scan order from the adjoint state ``G``
    (dL/dh after the last step); returns dL/dh of the state before the first step's decay."""
    n = tl.arange(0, N)
    A2 = A_nat * 1.4426950408889634
    dA_acc = tl.zeros([BD, N], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    for k in range(n_tiles):
        if REVERSE:  # scanned right to left: its backward runs left to right
            tile = k
        else:
            tile = n_tiles - 1 - k
        t = tile * T + tl.arange(0, T)
        tmask = t < length
        mask = tmask[:, None] & dmask[None, :]
        h = tl.load(bounds_ptr + tile * BD * N + tl.arange(0, BD)[:, None] * N + n[None, :])
        u = _load_td(u_ptr, t, d, su_l, su_d, mask)
        dt, raw = _step(dl_ptr, t, d, sdl_l, sdl_d, mask, bias, SOFTPLUS)
        Bt = _load_tn(B_ptr, t, n, sB_l, sB_n, tmask)
        Ct = _load_tn(C_ptr, t, n, sB_l, sB_n, tmask)
        dtu = dt * u
        decay = tl.exp2(dt[:, :, None] * A2[None, :, :])
        cA, cB = tl.associative_scan((decay, dtu[:, :, None] * Bt[:, None, :]), 0, _combine, reverse=REVERSE)
        hs = cA * h[None, :, :] + cB
        gy = _load_td(gout_ptr, t, d, sg_l, sg_d, mask)
        if HAS_Z:
            z = _load_td(z_ptr, t, d, sz_l, sz_d, mask)
            sig = tl.sigmoid(z)
            if WRITE_DZ:
                yp = _load_td(ypre_ptr, t, d, sy_l, sy_d, mask)
                dz = gy * yp * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + t[:, None] * sdz_l + d[None, :] * sdz_d, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            gy = gy * z * sig
        # The previous state and the next step's decay, in scan order, by shifting the tiles one
        # row; past the tile's edges: the state it started from and the decay of the step beyond
        # it (1 past either end of the sequence).
        rows = tl.arange(0, T)
        if REVERSE:
            first, last, prev_rows, next_rows, t_edge = T - 1, 0, rows + 1, rows - 1, tile * T - 1
        else:
            first, last, prev_rows, next_rows, t_edge = 0, T - 1, rows - 1, rows + 1, tile * T + T
        shape = tl.zeros([T, BD, N], dtype=tl.int32)
        h_prev = tl.gather(hs, tl.minimum(tl.maximum(prev_rows, 0), T - 1)[:, None, None] + shape, 0)
        h_prev = tl.where((rows == first)[:, None, None], h[None, :, :], h_prev)
        te = t_edge + tl.arange(0, 1)
        dt_edge, _ = _step(dl_ptr, te, d, sdl_l, sdl_d, ((te >= 0) & (te < length))[:, None] & dmask[None, :], bias,
                           SOFTPLUS)
        decay_next = tl.gather(decay, tl.minimum(tl.maximum(next_rows, 0), T - 1)[:, None, None] + shape, 0)
        decay_next = tl.where((rows == last)[:, None, None], tl.exp2(dt_edge[:, :, None] * A2[None, :, :]), decay_next)
        cG, cGb = tl.associative_scan((decay_next, gy[:, :, None] * Ct[:, None, :]), 0, _combine, reverse=not REVERSE)
        Gs = cG * G[None, :, :] + cGb  # dL/dh_t
        if REVERSE:
            G = _row(Gs, T - 1, T)
        else:
            G = _row(Gs, 0, T)
        tn_offs = t[:, None] * N + n[None, :]
        tl.store(dC_ptr + tn_offs, tl.sum(gy[:, :, None] * hs, axis=1), mask=tmask[:, None])
        tl.store(dB_ptr + tn_offs, tl.sum(Gs * dtu[:, :, None], axis=1), mask=tmask[:, None])
        GB = tl.sum(Gs * Bt[:, None, :], axis=2)
        du = GB * dt + gy * Dv[None, :]
        tl.store(du_ptr + t[:, None] * su_l + d[None, :] * su_d, du.to(du_ptr.dtype.element_ty), mask=mask)
        q = Gs * decay * h_prev  # dL/dh_t * exp(dt_t A) h_{t-1}
        ddt = GB * u + tl.sum(q * A_nat[None, :, :], axis=2)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(mask, ddt, 0.0)
        tl.store(ddl_ptr + t[:, None] * sdl_l + d[None, :] * sdl_d, ddt.to(ddl_ptr.dtype.element_ty), mask=mask)
        dA_acc += tl.sum(q * dt[:, :, None], axis=0)
        dD_acc += tl.sum(gy * u, axis=0)
        dbias_acc += tl.sum(ddt, axis=0)
    dmask2 = dmask[:, None] & (n[None, :] < N)
    tl.store(dA_ptr + d[:, None] * N + n[None, :], dA_acc, mask=dmask2)
    tl.store(dD_ptr + d, dD_acc, mask=dmask)
    tl.store(dbias_ptr + d, dbias_acc, mask=dmask)
    return G


@triton.jit
def _bwd_kernel(
    u0_ptr, u1_ptr, dl0_ptr, dl1_ptr, B0_ptr, B1_ptr, C0_ptr, C1_ptr, z_ptr, ypre_ptr, gout_ptr, glast_ptr,
    A_ptr, D_ptr, bias_ptr, bounds_ptr,
    du0_ptr, du1_ptr, ddl0_ptr, ddl1_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    batch, dim, length, n_tiles,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sB_b, sB_n, sB_l, sz_b, sz_d, sz_l, sy_b, sy_d, sy_l,
    sg_b, sg_d, sg_l, sdz_b, sdz_d, sdz_l,
    T: tl.constexpr, BD: tl.constexpr, N: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_GLAST: tl.constexpr, HAS_H0: tl.constexpr, BIDIRECTIONAL: tl.constexpr,
):
    pid_d, b = tl.program_id(0), tl.program_id(1)
    n_dblocks = tl.num_programs(0)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, N)
    dmask = d < dim
    dn = d[:, None] * N + n[None, :]
    dn_mask = dmask[:, None] & (n[None, :] < N)
    tile_stride = n_tiles * BD * N
    # dB, dC partials: (ndir, batch, n_dblocks, L, N); dA (ndir, batch, d, N); dD, dbias (ndir, batch, d)
    part = (b * n_dblocks + pid_d) * length * N
    if HAS_GLAST:
        G = tl.load(glast_ptr + b * dim * N + dn, mask=dn_mask, other=0.0)
    else:
        G = tl.zeros([BD, N], dtype=tl.float32)
    A_nat = tl.load(A_ptr + dn, mask=dn_mask, other=0.0)
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0)
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
    G = _bwd_pass(
        u0_ptr + b * su_b, dl0_ptr + b * sdl_b, B0_ptr + b * sB_b, C0_ptr + b * sB_b, z_ptr + b * sz_b,
        ypre_ptr + b * sy_b, gout_ptr + b * sg_b, bounds_ptr + (b * n_dblocks + pid_d) * tile_stride,
        du0_ptr + b * su_b, ddl0_ptr + b * sdl_b, dz_ptr + b * sdz_b, dB_ptr + part, dC_ptr + part,
        dA_ptr + b * dim * N, dD_ptr + b * dim, dbias_ptr + b * dim,
        G, A_nat, Dv, bias, d, dmask, length, n_tiles,
        su_l, su_d, sdl_l, sdl_d, sB_l, sB_n, sz_l, sz_d, sy_l, sy_d, sg_l, sg_d, sdz_l, sdz_d,
        T, BD, N, SOFTPLUS, False, HAS_Z, HAS_Z,
    )
    if HAS_H0:  # dL/dh0 = exp(dt_0 A) dL/dh_0
        t0 = tl.arange(0, 1)
        dt0, _ = _step(dl0_ptr + b * sdl_b, t0, d, sdl_l, sdl_d, (t0 < length)[:, None] & dmask[None, :], bias,
                       SOFTPLUS)
        decay0 = tl.sum(tl.exp2(dt0[:, :, None] * (A_nat * 1.4426950408889634)[None, :, :]), axis=0)
        tl.store(dh0_ptr + b * dim * N + dn, G * decay0, mask=dn_mask)
    if BIDIRECTIONAL:
        other = batch * n_dblocks * length * N
        A_nat = tl.load(A_ptr + dim * N + dn, mask=dn_mask, other=0.0)
        Dv = tl.load(D_ptr + dim + d, mask=dmask, other=0.0)
        bias = tl.load(bias_ptr + dim + d, mask=dmask, other=0.0)
        _bwd_pass(
            u1_ptr + b * su_b, dl1_ptr + b * sdl_b, B1_ptr + b * sB_b, C1_ptr + b * sB_b, z_ptr + b * sz_b,
            ypre_ptr + b * sy_b, gout_ptr + b * sg_b, bounds_ptr + ((batch + b) * n_dblocks + pid_d) * tile_stride,
            du1_ptr + b * su_b, ddl1_ptr + b * sdl_b, dz_ptr + b * sdz_b, dB_ptr + other + part,
            dC_ptr + other + part, dA_ptr + (batch + b) * dim * N, dD_ptr + (batch + b) * dim,
            dbias_ptr + (batch + b) * dim,
            tl.zeros([BD, N], dtype=tl.float32), A_nat, Dv, bias, d, dmask, length, n_tiles,
            su_l, su_d, sdl_l, sdl_d, sB_l, sB_n, sz_l, sz_d, sy_l, sy_d, sg_l, sg_d, sdz_l, sdz_d,
            T, BD, N, SOFTPLUS, True, HAS_Z, False,
        )


def _like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised (b, k, L) tensor laid out as ``t`` is: over channels-last memory when
    ``t`` has unit stride over its channels, else contiguous."""
    b, k, length = t.shape
    dtype = dtype or t.dtype
    if t.stride(1) == 1 and k > 1:
        return _empty(b, length, k, device=t.device, dtype=dtype).transpose(1, 2)
    return _empty(b, k, length, device=t.device, dtype=dtype)


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _pair(a: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """The two directions' tensors with one set of strides (the kernels take one per input)."""
    if b is None:
        return a, a
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


class _TiledScan(torch.autograd.Function):
    """u, delta (b, d, L) and B, C (b, N, L) per direction (the second None for one direction),
    any strides; z (b, d, L) or None; A (ndir, d, N), D and the dt bias (ndir, d) fp32; h0
    (b, d, N) fp32 or None. Returns the gated sum of the directions (b, d, L) in u's dtype, over
    channels-last memory, and (one direction) the last state (b, d, N) fp32."""

    @staticmethod
    def forward(ctx, u0, u1, dl0, dl1, B0, B1, C0, C1, z, A, D, bias, h0, softplus: bool, config):  # noqa: D102
        bidirectional = u1 is not None
        T, BD, warps = config
        batch, dim, length = u0.shape
        n = A.shape[-1]
        u0, u1 = _pair(u0, u1)
        dl0, dl1 = _pair(dl0, dl1)
        B0, C0 = _pair(B0, C0)
        B1, C1 = _pair(B1, C1) if bidirectional else (B0, C0)
        if B1.stride() != B0.stride():
            B0, C0, B1, C1 = (t.contiguous() for t in (B0, C0, B1, C1))
        n_tiles = triton.cdiv(length, T)
        n_dblocks = triton.cdiv(dim, BD)
        ndir = 2 if bidirectional else 1
        save = any(ctx.needs_input_grad)  # else (sampling) neither the states nor the ungated sum are kept
        out = _empty(batch, length, dim, device=u0.device, dtype=u0.dtype).transpose(1, 2)
        ypre = out
        if z is not None and save:
            ypre = _empty(batch, length, dim, device=u0.device, dtype=u0.dtype).transpose(1, 2)
        shape = (ndir, batch, n_dblocks, n_tiles, BD, n) if save else (1,)  # never a null pointer
        bounds = _empty(*shape, device=u0.device, dtype=torch.float32)
        last = _empty(batch, dim, n, device=u0.device, dtype=torch.float32) if not bidirectional else out
        zz = z if z is not None else u0
        _fwd_kernel[(n_dblocks, batch)](
            u0, u1, dl0, dl1, B0, B1, C0, C1, zz, A, D, bias, h0 if h0 is not None else out,
            ypre, out, bounds, last,
            batch, dim, length, n_tiles,
            *_strides(u0), *_strides(dl0), *_strides(B0), *_strides(zz), *_strides(out),
            T=T, BD=BD, N=n, SOFTPLUS=softplus, HAS_Z=z is not None, HAS_H0=h0 is not None,
            BIDIRECTIONAL=bidirectional, SAVE=save, num_warps=warps,
        )
        ctx.save_for_backward(u0, u1, dl0, dl1, B0, B1, C0, C1, z, A, D, bias, bounds, ypre)
        ctx.setup = (softplus, config, bidirectional, h0 is not None)
        if bidirectional:
            return out, None
        return out, last

    @staticmethod
    def backward(ctx, grad_out, grad_last):  # noqa: D102
        u0, u1, dl0, dl1, B0, B1, C0, C1, z, A, D, bias, bounds, ypre = ctx.saved_tensors
        softplus, (T, BD, warps), bidirectional, has_h0 = ctx.setup
        batch, dim, length = u0.shape
        ndir, _, n_dblocks, n_tiles, _, n = bounds.shape
        f32 = dict(device=u0.device, dtype=torch.float32)
        if grad_out is None:
            grad_out = torch.zeros_like(ypre)
        du0, ddl0 = _like(u0), _like(dl0)
        du1, ddl1 = (_like(u1), _like(dl1)) if bidirectional else (du0, ddl0)
        dz = _like(ypre, z.dtype) if z is not None else du0
        dB = _empty(ndir, batch, n_dblocks, length, n, **f32)
        dC = _empty(ndir, batch, n_dblocks, length, n, **f32)
        dA = _empty(ndir, batch, dim, n, **f32)
        dD, dbias = _empty(ndir, batch, dim, **f32), _empty(ndir, batch, dim, **f32)
        dh0 = _empty(batch, dim, n, **f32) if has_h0 else dA
        _bwd_kernel[(n_dblocks, batch)](
            u0, u1, dl0, dl1, B0, B1, C0, C1, z if z is not None else u0, ypre, grad_out,
            grad_last.contiguous() if grad_last is not None else dA,
            A, D, bias, bounds,
            du0, du1, ddl0, ddl1, dz, dB, dC, dA, dD, dbias, dh0,
            batch, dim, length, n_tiles,
            *_strides(u0), *_strides(dl0), *_strides(B0), *_strides(z if z is not None else u0), *_strides(ypre),
            *_strides(grad_out), *_strides(dz),
            T=T, BD=BD, N=n, SOFTPLUS=softplus, HAS_Z=z is not None, HAS_GLAST=grad_last is not None,
            HAS_H0=has_h0, BIDIRECTIONAL=bidirectional, num_warps=warps,
        )
        dB, dC = dB.sum(2).transpose(-1, -2), dC.sum(2).transpose(-1, -2)  # (ndir, b, N, L)
        return (
            du0, du1 if bidirectional else None, ddl0, ddl1 if bidirectional else None,
            dB[0].to(B0.dtype), dB[1].to(B1.dtype) if bidirectional else None,
            dC[0].to(C0.dtype), dC[1].to(C1.dtype) if bidirectional else None,
            dz if z is not None else None, dA.sum(1), dD.sum(1), dbias.sum(1),
            dh0 if has_h0 else None, None, None,
        )


def _params(t: Tensor | Sequence[Tensor] | None, ndir: int, dim: int, like: Tensor) -> Tensor:
    """A per-direction parameter (D, the dt bias) as (ndir, dim) fp32; zeros when absent."""
    if t is None:
        return torch.zeros(ndir, dim, device=like.device, dtype=torch.float32)
    if not isinstance(t, Tensor):
        t = torch.stack(list(t))
    return t.float().reshape(ndir, dim).contiguous()


def _check(A: Tensor, u: Tensor) -> None:
    n = A.shape[-1]
    if n & (n - 1):
        raise BackendError(f"the triton_tiled selective scan needs d_state to be a power of two, got {n}")
    if u.dtype == torch.float64:
        raise BackendError("the triton_tiled selective scan computes in fp32; for float64 use cpu or chunked")


def selective_scan_triton_tiled(
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
    block_d: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as :func:`~dis_dist.ops.selective_scan.reference.selective_scan_ref`;
    ``chunk_size`` is the tile length T (a power of two)."""
    _check(A, u)
    dim = u.shape[1]
    y, last = _TiledScan.apply(
        u, None, delta, None, B, None, C, None, z, A.float()[None].contiguous(),
        _params(D, 1, dim, u), _params(delta_bias, 1, dim, u),
        None if initial_state is None else initial_state.float().contiguous(), delta_softplus,
        tile_config(u.device, chunk_size, block_d),
    )
    return (y, last) if return_last_state else y


def bidirectional_selective_scan_triton_tiled(
    u: Tensor | Sequence[Tensor],
    delta: Tensor | Sequence[Tensor],
    A: Tensor | Sequence[Tensor],
    B: Tensor | Sequence[Tensor],
    C: Tensor | Sequence[Tensor],
    D: Tensor | Sequence[Tensor] | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | Sequence[Tensor] | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
    block_d: int | None = None,
) -> Tensor:
    """Same contract as the reference's bidirectional scan. The per-direction inputs may be
    stacked (leading axis 2) or pairs (forward, backward) of tensors with any strides: read in
    place, never stacked or copied."""
    (u0, u1), (dl0, dl1), (B0, B1), (C0, C1) = u, delta, B, C
    A = A if isinstance(A, Tensor) else torch.stack(list(A))
    _check(A, u0)
    dim = u0.shape[1]
    y, _ = _TiledScan.apply(
        u0, u1, dl0, dl1, B0, B1, C0, C1, z, A.float().contiguous(), _params(D, 2, dim, u0),
        _params(delta_bias, 2, dim, u0), None, delta_softplus, tile_config(u0.device, chunk_size, block_d),
    )
    return y
