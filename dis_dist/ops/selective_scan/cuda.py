"""mamba-ssm's CUDA selective-scan kernel (its extension module ``selective_scan_cuda``).

The extension comes from ``$DIS_MAMBA_SCAN_EXT`` (a directory holding ``selective_scan_cuda.so``,
as ``tools/build_mamba_scan.py`` builds it from mamba-ssm's sdist, or the .so itself), else
``$TORCH_EXTENSIONS_DIR/selective_scan_cuda``, else an installed mamba-ssm. The autograd function
calls it as mamba-ssm 2.3.2's ``SelectiveScanFn`` does. The kernel takes no initial state (the
dispatcher sends such calls to the next backend), does not backpropagate through the last state
(an error if asked to) and cannot index time backwards, so the bidirectional scan runs twice, the
second time on reversed copies: the "cuda x2+flips" anchor of the GPU benchmarks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from dis_dist.errors import BackendError

ENV_VAR = "DIS_MAMBA_SCAN_EXT"
EXT_NAME = "selective_scan_cuda"
HOW_TO_BUILD = (
    f"build it with `bash tools/gpu_deps.sh` (where PyPI is reachable), then, on the GPU machine, "
    f"`python3 tools/build_mamba_scan.py .gpu_deps --out DIR` and set {ENV_VAR}=DIR"
)


def _load_file(so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(EXT_NAME, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"{so} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def extension() -> ModuleType | str:
    """The ``selective_scan_cuda`` module, or why none can be loaded."""
    places: list[tuple[str, Path]] = []
    if os.environ.get(ENV_VAR):
        places.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR])))
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        places.append(("$TORCH_EXTENSIONS_DIR", Path(os.environ["TORCH_EXTENSIONS_DIR"]) / EXT_NAME))
    for origin, path in places:
        so = path / f"{EXT_NAME}.so" if path.is_dir() else path
        if so.is_file():
            try:
                return _load_file(so)
            except (ImportError, OSError) as e:  # built for another PyTorch or CUDA, a partial build
                return f"{so} (from {origin}) cannot be loaded ({e}); rebuild it: {HOW_TO_BUILD}"
        if origin == f"${ENV_VAR}":  # asked for by name: no fallback to another build
            return f"{ENV_VAR}={path} holds no {EXT_NAME}.so; {HOW_TO_BUILD}"
    try:
        return importlib.import_module(EXT_NAME)  # mamba-ssm's wheel installs it top-level
    except Exception as e:  # ImportError, or the installed extension failing to load
        return f"no {EXT_NAME} extension ({type(e).__name__}: {e}); {HOW_TO_BUILD}, or install mamba-ssm"


def unavailable(device: torch.device) -> str | None:
    """Why this backend cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return "mamba-ssm's kernel runs on CUDA devices only"
    ext = extension()
    return ext if isinstance(ext, str) else None


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # the kernel reads rows along L


class _SelectiveScan(torch.autograd.Function):
    """mamba-ssm 2.3.2's ``SelectiveScanFn`` over whichever ``selective_scan_cuda`` was found."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ext = extension()
        u, delta, B, C = (_last_contiguous(t) for t in (u, delta, B, C))
        z = None if z is None else _last_contiguous(z)
        D = None if D is None else D.contiguous()
        ctx.squeeze_B, ctx.squeeze_C = B.dim() == 3, C.dim() == 3
        B = B.unsqueeze(1) if ctx.squeeze_B else B  # (b, N, L) -> one group: (b, 1, N, L)
        C = C.unsqueeze(1) if ctx.squeeze_C else C
        out, x, *rest = ext.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.delta_softplus, ctx.has_z = delta_softplus, z is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out if z is not None else None)
        ctx.set_materialize_grads(False)
        y = rest[0] if z is not None else out  # out * silu(z) when gated
        last_state = x[:, :, -1, 1::2]  # (b, d, N): the last chunk's state
        return (y, last_state) if return_last_state else y

    @staticmethod
    def backward(ctx, dout, *d_last):
        if d_last and d_last[0] is not None and bool(d_last[0].ne(0).any()):
            raise BackendError(
                "the cuda (mamba-ssm) scan does not backpropagate through its last state; "
                "use the triton or chunked backend for this (e.g. context parallelism)"
            )
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(delta)
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = extension().bwd(
            u, delta, A, B, C, D, z, delta_bias, _last_contiguous(dout), x, out, None, ctx.delta_softplus,
            False,  # recompute out_z: not needed
        )
        return (
            du, ddelta, dA,
            dB.squeeze(1) if ctx.squeeze_B else dB,
            dC.squeeze(1) if ctx.squeeze_C else dC,
            dD if D is not None else None,
            rest[0] if ctx.has_z else None,
            ddelta_bias if delta_bias is not None else None,
            None, None,
        )


def selective_scan_cuda(
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
    """Same contract as the reference, without ``initial_state`` and without a gradient through
    the last state. delta, B, C and z take u's dtype (the kernel wants one input dtype; fp32 or
    bf16 in a tools/build_mamba_scan.py build, also fp16 in mamba-ssm's); A, D and delta_bias
    are fp32. Returns u's dtype, the last state in fp32."""
    if initial_state is not None:
        raise ValueError("mamba-ssm's selective scan takes no initial state")  # the dispatcher avoids this
    if u.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise BackendError(f"the cuda (mamba-ssm) scan takes float32 or bfloat16 inputs, not {u.dtype}")
    delta, B, C = (t.to(u.dtype) for t in (delta, B, C))
    return _SelectiveScan.apply(
        u, delta, A.float(), B, C, None if D is None else D.float(), None if z is None else z.to(u.dtype),
        None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state,
    )


def bidirectional_selective_scan_cuda(
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
    """Same contract as the reference's bidirectional scan, as the official DiS computes it: two
    calls, the second on reversed copies (each gated by z; the gate is linear, so it sums)."""

    def one(k: int, flip: bool) -> Tensor:
        def o(t: Tensor | None) -> Tensor | None:
            return None if t is None else (t.flip(-1) if flip else t)

        y = selective_scan_cuda(
            o(u[k]), o(delta[k]), A[k], o(B[k]), o(C[k]), None if D is None else D[k], o(z),
            None if delta_bias is None else delta_bias[k], delta_softplus,
        )
        return o(y)

    return one(0, False) + one(1, True)
