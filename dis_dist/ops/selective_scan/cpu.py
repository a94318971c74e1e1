"""Native CPU selective scan (C++, ``csrc/scan_cpu.cpp``) and the mixer's depthwise convs + SiLU.

Built on first use with ``torch.utils.cpp_extension.load`` into ``$TORCH_EXTENSIONS_DIR`` (the
cache the Makefile also gives DeepSpeed's ops; about half a minute, once per machine type), for the
host's vector instructions. Channels last: the kernel reads (batch, L, d) rows, as the mixer's
projections write them, so the mixer's inputs reach it without copies. Per block of 16 fp32
channels (8 fp64), the block's N states stay in registers through the sequence; the forward
pass keeps the states at chunk boundaries only and the backward pass recomputes each chunk from
its boundary. softplus(delta + bias), D, the z gate and both directions of the bidirectional
scan are fused. Computes in fp32 (bf16/fp16 inputs) or fp64.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from dis_dist.errors import BackendError

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 32
SOURCE = Path(__file__).parent / "csrc" / "scan_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast"]


def _host_tag() -> str:
    """The build's name varies with the host's instruction set: ``-march=native`` code must not
    be loaded on another CPU sharing the cache directory."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    key = f"{platform.machine()} {flags} {torch.__version__}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


@functools.cache
def _build() -> ModuleType | str:
    """The compiled extension, or why it cannot be built here (no compiler, a build error)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    from torch.utils import cpp_extension

    name = f"dis_scan_cpu_{_host_tag()}"
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    except OSError as e:  # read-only, a file in the way, no permission: the reason names the place
        where = os.environ.get("TORCH_EXTENSIONS_DIR", "the default torch_extensions directory")
        return (f"its build directory under TORCH_EXTENSIONS_DIR={where} cannot be made ({e.strerror}: "
                f"{e.filename}); point TORCH_EXTENSIONS_DIR at a writable directory")
    if not (build_dir / f"{name}.so").exists():
        log.info("building the native CPU scan kernel (once, about half a minute) in %s", build_dir)
    try:
        return cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as e:  # compiler errors, missing headers: the reason goes to the caller
        lines = str(e).strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()] or lines or [type(e).__name__]
        return f"building {SOURCE.name} failed: {errors[min(1, len(errors) - 1)]}"


def unavailable(device: torch.device) -> str | None:
    """Why this backend cannot run on ``device`` (None when it can); builds it on first call."""
    if device.type != "cpu":
        return "the native kernel runs on CPU tensors only"
    built = _build()
    return built if isinstance(built, str) else None


def _ext() -> ModuleType:
    built = _build()
    if isinstance(built, str):
        raise BackendError(f"the native CPU scan kernel is not available: {built}")
    return built


class _CpuScan(torch.autograd.Function):
    """Channels last, compute dtype: u, delta (ndir, b, L, d); A (ndir, N, d); B, C (ndir, b, L, N);
    D, bias (ndir, d); z (b, L, d) or None; h0 (ndir, b, N, d) or None. Returns the gated sum of the
    directions (b, L, d) and the last states (ndir, b, N, d)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, bias, z, h0, softplus: bool, chunk: int):  # noqa: D102
        save = any(ctx.needs_input_grad)
        out, last, bounds = _ext().scan_forward(u, delta, A, B, C, D, bias, z, h0, softplus, chunk, save)
        ctx.softplus, ctx.chunk, ctx.has_h0 = softplus, chunk, h0 is not None
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, bias, z, bounds)
        return out, last

    @staticmethod
    def backward(ctx, grad_out, grad_last):  # noqa: D102
        u, delta, A, B, C, D, bias, z, bounds = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros(u.shape[1:], dtype=u.dtype)
        gu, gdelta, gA, gB, gC, gD, gbias, gz, gh0 = _ext().scan_backward(
            u, delta, A, B, C, D, bias, z, bounds, grad_out.contiguous(),
            None if grad_last is None else grad_last.contiguous(), ctx.softplus, ctx.chunk,
        )
        return (gu, gdelta, gA, gB, gC, gD, gbias, gz if z is not None else None,
                gh0 if ctx.has_h0 else None, None, None)


def _channels_last(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(..., k, L) -> contiguous (..., L, k); no copy when the memory already is in that order."""
    return t.to(dtype).transpose(-1, -2).contiguous()


def _scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, softplus: bool, h0: Tensor | None, chunk: int | None,
) -> tuple[Tensor, Tensor]:
    """Per-direction inputs with a leading direction axis, in the reference's layout (u, delta
    (ndir, b, d, L), ...). Returns y (b, d, L) as a view of channels-last memory and the last
    states (ndir, b, d, N), in the compute dtype."""
    compute = torch.promote_types(u.dtype, torch.float32)
    ndir, _, dim, _ = u.shape
    zeros = u.new_zeros(ndir, dim, dtype=compute)
    out, last = _CpuScan.apply(
        _channels_last(u, compute), _channels_last(delta, compute), _channels_last(A, compute),
        _channels_last(B, compute), _channels_last(C, compute),
        zeros if D is None else D.to(compute).contiguous(),
        zeros if delta_bias is None else delta_bias.to(compute).contiguous(),
        None if z is None else _channels_last(z, compute),
        None if h0 is None else _channels_last(h0, compute),
        softplus, chunk or DEFAULT_CHUNK,
    )
    return out.transpose(-1, -2), last.transpose(-1, -2)


def selective_scan_cpu(
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
    y, last = _scan(
        u[None], delta[None], A[None], B[None], C[None], None if D is None else D[None], z,
        None if delta_bias is None else delta_bias[None], delta_softplus,
        None if initial_state is None else initial_state[None], chunk_size,
    )
    out = y.to(u.dtype)
    return (out, last[0]) if return_last_state else out


def bidirectional_selective_scan_cpu(
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
    """Same contract as the reference's bidirectional scan; direction 1 runs right to left
    inside the kernel (no reversed copies). Fastest when u, delta, B, C and z are views of
    channels-last memory (what :class:`~dis_dist.models.mamba.BiMamba` hands it)."""
    y, _ = _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, chunk_size)
    return y.to(u.dtype)


class _CpuConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102
        ctx.save_for_backward(x, weight, bias)
        return _ext().conv_silu_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return tuple(_ext().conv_silu_backward(*ctx.saved_tensors, grad.contiguous()))


def depthwise_conv_silu_cpu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The mixer's two depthwise convs over the sequence, each followed by SiLU, in one pass:
    x (b, d, L), weight (2, d, K), bias (2, d). Direction 0 is causal (output t sees
    x[t-K+1..t]); direction 1 is the causal conv of the reversed sequence reversed back (output t
    sees x[t..t+K-1], weight[1, :, K-1] on x[t]). Returns both, stacked: (2, b, d, L) as a view of
    channels-last memory, the layout the native scan reads; fastest when x is one (unit stride
    over d). The convs' outputs before SiLU are recomputed in the backward pass, not kept."""
    x_cl = x.transpose(1, 2)
    if x_cl.stride(-1) != 1:
        x_cl = x_cl.contiguous()
    return _CpuConvSilu.apply(x_cl, weight.contiguous(), bias.contiguous()).transpose(-1, -2)
