"""Selective scan: one function, several backends with the same semantics (``reference`` defines it).

``backend="auto"`` picks the best backend that can run on the inputs' device; the environment
variable ``DIS_SCAN_BACKEND`` or the model config may name one instead. A named backend that
cannot run raises :class:`~dis_dist.errors.BackendError`; there is no silent fallback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dis_dist.errors import BackendError
from dis_dist.ops.selective_scan.chunked import (
    bidirectional_selective_scan_chunked,
    selective_scan_chunked,
)
from dis_dist.ops.selective_scan.reference import (
    bidirectional_selective_scan_ref,
    selective_scan_ref,
)

log = logging.getLogger(__name__)

ENV_VAR = "DIS_SCAN_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    scan: Callable[..., Tensor | tuple[Tensor, Tensor]]
    bidirectional: Callable[..., Tensor]
    # Returns None when the backend can run on this device, else the reason it cannot.
    unavailable: Callable[[torch.device], str | None]


BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        "reference", selective_scan_ref, bidirectional_selective_scan_ref, lambda device: None
    ),
    "chunked": Backend(
        "chunked", selective_scan_chunked, bidirectional_selective_scan_chunked, lambda device: None
    ),
}
# Preference order of "auto" per device type; the first available backend wins.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("chunked",), "cpu": ("chunked",)}

_logged: set[str] = set()


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``."""
    device = torch.device(device)
    return [name for name, b in BACKENDS.items() if b.unavailable(device) is None]


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """Turn a requested name ("auto", a backend name, or None for the environment) into a Backend."""
    requested = os.environ.get(ENV_VAR, "auto") if backend in (None, "", "auto") else backend
    if requested == "auto":
        order = AUTO_ORDER.get(device.type, ("chunked",))
        name = next(n for n in order if BACKENDS[n].unavailable(device) is None)
    else:
        if requested not in BACKENDS:
            raise BackendError(
                f"unknown selective-scan backend {requested!r} (from "
                f"{'$' + ENV_VAR if backend in (None, '', 'auto') else 'the backend argument'}); "
                f"choose one of: auto, {', '.join(BACKENDS)}"
            )
        reason = BACKENDS[requested].unavailable(device)
        if reason is not None:
            raise BackendError(
                f"selective-scan backend {requested!r} cannot run on {device}: {reason}. "
                f"Available here: {', '.join(available_backends(device))}"
            )
        name = requested
    key = f"{name}@{device.type}"
    if key not in _logged:
        _logged.add(key)
        log.info("selective-scan backend: %s on %s (requested %r)", name, device.type, requested)
    return BACKENDS[name]


def selective_scan(
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
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan, mamba-ssm layout: u, delta, z (batch, d_inner, L); A (d_inner, N);
    B, C (batch, N, L); initial/last state (batch, d_inner, N)."""
    impl = resolve_backend(backend, u.device)
    return impl.scan(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, return_last_state=return_last_state,
    )


def bidirectional_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Forward scan of direction 0 plus right-to-left scan of direction 1, gated by z once.

    Per-direction tensors have a leading axis of 2 and are in sequence order:
    u, delta (2, b, d, L); A (2, d, N); B, C (2, b, N, L); D, delta_bias (2, d); z (b, d, L).
    """
    impl = resolve_backend(backend, u.device)
    return impl.bidirectional(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus
    )


__all__ = [
    "BACKENDS",
    "available_backends",
    "bidirectional_selective_scan",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
]
