"""Selective scan: one function, several backends with the same semantics (``reference`` defines it).

``backend="auto"`` picks the best backend that can run on the inputs' device and logs, once, its
choice and why it passed over the ones before it; the environment variable ``DIS_SCAN_BACKEND`` or
the model config may name one instead. A named backend that cannot run raises
:class:`~dis_dist.errors.BackendError`; there is no silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from dis_dist.errors import BackendError
from dis_dist.ops.selective_scan.reference import selective_scan_ref

log = logging.getLogger(__name__)

ENV_VAR = "DIS_SCAN_BACKEND"


@dataclass(frozen=True)
class Backend:
    """A backend's module is imported on first use, so optional dependencies stay optional."""

    name: str
    module: str
    scan_fn: str
    bidirectional_fn: str
    requires: str | None = None  # a package that must be importable
    # Takes an initial state and differentiates through the last one (what context parallelism needs).
    takes_states: bool = True
    # How the bidirectional scan wants its per-direction inputs: "pairs" (read in place, any
    # strides), else stacked on a leading axis of 2, "contiguous" or "channels_last" in memory.
    directions: str = "contiguous"

    def _module(self):  # noqa: ANN202
        return importlib.import_module(f"dis_dist.ops.selective_scan.{self.module}")

    @property
    def scan(self) -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
        return getattr(self._module(), self.scan_fn)

    @property
    def bidirectional(self) -> Callable[..., Tensor]:
        return getattr(self._module(), self.bidirectional_fn)

    def unavailable(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else the reason it cannot."""
        return _unavailable(self, device.type, os.environ.get("TRITON_INTERPRET", ""))


@functools.cache
def _unavailable(backend: Backend, device_type: str, _interpret: str) -> str | None:
    if backend.requires and importlib.util.find_spec(backend.requires) is None:
        return f"{backend.requires} is not installed (pip install {backend.requires})"
    check = getattr(backend._module(), "unavailable", None)
    return check(torch.device(device_type)) if check else None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", "reference", "selective_scan_ref", "bidirectional_selective_scan_ref"),
        Backend("chunked", "chunked", "selective_scan_chunked", "bidirectional_selective_scan_chunked"),
        Backend("cpu", "cpu", "selective_scan_cpu", "bidirectional_selective_scan_cpu", directions="channels_last"),
        Backend("triton", "triton", "selective_scan_triton", "bidirectional_selective_scan_triton",
                requires="triton"),
        Backend("triton_tiled", "triton_tiled", "selective_scan_triton_tiled",
                "bidirectional_selective_scan_triton_tiled", requires="triton", directions="pairs"),
        Backend("cuda", "cuda", "selective_scan_cuda", "bidirectional_selective_scan_cuda",
                takes_states=False),
    )
}
# Preference order of "auto" per device type; the first available backend wins.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "chunked"), "cpu": ("cpu", "chunked")}

_logged: set[str] = set()


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``."""
    device = torch.device(device)
    return [name for name, b in BACKENDS.items() if b.unavailable(device) is None]


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """Turn a requested name ("auto", a backend name, or None for the environment) into a Backend."""
    requested = os.environ.get(ENV_VAR, "auto") if backend in (None, "", "auto") else backend
    skipped: list[str] = []
    if requested == "auto":
        for name in AUTO_ORDER.get(device.type, ("chunked",)):
            reason = BACKENDS[name].unavailable(device)
            if reason is None:
                break
            skipped.append(f"{name}: {reason}")
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
        why = f"; not {', '.join(skipped)}" if skipped else ""
        log.info("selective-scan backend: %s on %s (requested %r%s)", name, device.type, requested, why)
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
    if (initial_state is not None or return_last_state) and not impl.takes_states:
        impl = _with_states(impl, u.device)
    return impl.scan(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, return_last_state=return_last_state,
    )


def _with_states(impl: Backend, device: torch.device) -> Backend:
    """The next backend of the device's auto order that takes states (logged once)."""
    order = AUTO_ORDER.get(device.type, ("chunked",))
    name = next(
        n for n in order if BACKENDS[n].takes_states and BACKENDS[n].unavailable(device) is None
    )
    key = f"{impl.name}->{name}@{device.type}"
    if key not in _logged:
        _logged.add(key)
        log.info("selective-scan backend %s takes no initial state and no gradient of its last one: "
                 "such calls run on %s", impl.name, name)
    return BACKENDS[name]


Directions = Tensor | Sequence[Tensor]  # stacked on a leading axis of 2, or a (forward, backward) pair


def stack_directions(t: Directions, channels_last: bool = False) -> Tensor:
    """A per-direction input as one tensor with a leading axis of 2 (as it is, if it is one).
    ``channels_last``: (2, b, k, L) over (2, b, L, k) memory, the native CPU kernel's layout,
    which the mixer's projections write (then the stack is the only copy)."""
    if isinstance(t, Tensor):
        return t
    if not channels_last or t[0].ndim < 3:
        return torch.stack(list(t))
    return rearrange(torch.stack([rearrange(x, "b k l -> b l k") for x in t]), "two b l k -> two b k l")


def arrange_directions(
    pairs: Iterable[tuple[Tensor, Tensor]], backend: str, device: torch.device
) -> Iterator[Directions]:
    """The scan's inputs, given as (forward, backward) pairs, as ``backend`` takes them: the pairs
    as they are, or each stacked in the layout it wants. A generator, stacking one input at a
    time: unpacked at once, each pair can be freed as soon as it is stacked, so the two copies
    never all live together (what a sampling batch's peak memory, and the planner, count on)."""
    impl = resolve_backend(backend, device)
    for pair in pairs:
        yield pair if impl.directions == "pairs" else stack_directions(pair, impl.directions == "channels_last")


def bidirectional_selective_scan(
    u: Directions,
    delta: Directions,
    A: Directions,
    B: Directions,
    C: Directions,
    D: Directions | None = None,
    z: Tensor | None = None,
    delta_bias: Directions | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Forward scan of direction 0 plus right-to-left scan of direction 1, gated by z once.

    Per-direction inputs are in sequence order, stacked on a leading axis of 2 or as a
    (forward, backward) pair: u, delta (2, b, d, L); A (2, d, N); B, C (2, b, N, L); D,
    delta_bias (2, d); z (b, d, L). Pairs reach a backend that reads them in place as they are,
    and are stacked in the layout it wants otherwise.
    """
    impl = resolve_backend(backend, u[0].device)
    if impl.directions != "pairs":
        channels_last = impl.directions == "channels_last"
        u, delta, A, B, C = (stack_directions(t, channels_last) for t in (u, delta, A, B, C))
        D, delta_bias = (None if t is None else stack_directions(t) for t in (D, delta_bias))
    return impl.bidirectional(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus
    )


__all__ = [
    "BACKENDS",
    "arrange_directions",
    "available_backends",
    "bidirectional_selective_scan",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "stack_directions",
]
