"""mamba-ssm's CUDA selective-scan kernel (optional extra: ``pip install .[cuda]``).

It takes no initial state (the dispatcher sends such calls to the next backend) and cannot
index time backwards, so the bidirectional scan reverses the second direction's inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "mamba-ssm's kernel runs on CUDA devices only"
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except Exception as e:  # ImportError, or its CUDA extension failing to load
        return (
            f"mamba-ssm cannot be imported ({type(e).__name__}: {e}); install it with "
            f"MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation '.[cuda]'"
        )
    return None


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
    """Same contract as the reference, without ``initial_state``."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if initial_state is not None:
        raise ValueError("mamba-ssm's selective scan takes no initial state")  # the dispatcher avoids this
    return selective_scan_fn(
        u, delta, A.float(), B, C, None if D is None else D.float(), z,
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
    """Same contract as the reference's bidirectional scan: two calls, the second on reversed copies."""

    def one(k: int, flip: bool) -> Tensor:
        def o(t: Tensor | None) -> Tensor | None:
            return None if t is None else (t.flip(-1) if flip else t)

        y = selective_scan_cuda(
            o(u[k]), o(delta[k]), A[k], o(B[k]), o(C[k]), None if D is None else D[k], o(z),
            None if delta_bias is None else delta_bias[k], delta_softplus,
        )
        return o(y)

    return one(0, False) + one(1, True)
