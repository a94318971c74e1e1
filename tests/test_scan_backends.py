"""Every selective-scan backend against the float64 reference.

The reference runs in float64 on the same (rounded) input values; the backend runs in its own
precision. Errors are relative to the scale of each tensor: max|backend - reference| /
max|reference|. Documented tolerances (README): fp32 <= 1e-5, bf16 inputs <= 2e-2.

The triton backend runs under Triton's interpreter on CPU (TRITON_INTERPRET=1, set by conftest
when no GPU is present) with small shapes. On a GPU machine the backend comparisons (``_compare``)
run on the GPU, the reference staying on the CPU (tools/gpu_check.sh).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dis_dist.ops.selective_scan import bidirectional_selective_scan, selective_scan
from tests.conftest import require

F64 = torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where _compare runs backends
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}
CHUNK = 8  # the chunk size these tests run with; L below covers T-1, T, T+1 and non-multiples
LENGTHS = [1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 258, pytest.param(1025, marks=pytest.mark.slow)]
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def _need(backend: str) -> None:
    if backend.startswith("triton"):
        require(importlib.util.find_spec("triton") is not None, "triton (pip install triton)")


def _inputs(b, d, L, N, *, seed=0, large_decay=False, with_zd=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    A = -torch.rand(d, N, generator=g, dtype=F64) * (60.0 if large_decay else 2.0) - 0.1
    t = dict(
        u=r(b, d, L), delta=r(b, d, L, scale=0.5) + (3.0 if large_decay else -1.0), A=A,
        B=r(b, N, L), C=r(b, N, L), D=r(d) if with_zd else None, z=r(b, d, L) if with_zd else None,
        delta_bias=r(d, scale=0.3), initial_state=r(b, d, N),
    )
    return t


_PARAMS = ("A", "D", "delta_bias", "initial_state")  # kept in fp32 when activations are bf16


def _cast(t: dict, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in t.items():
        if v is None:
            out[k] = None
            continue
        target = torch.float32 if (dtype == torch.bfloat16 and k in _PARAMS) else dtype
        out[k] = v.to(device=DEVICE, dtype=target).requires_grad_()
    return out


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _compare(backend, dtype, L, *, chunk=CHUNK, softplus=True, with_zd=True, large_decay=False,
             b=2, d=6, N=4):
    base = _inputs(b, d, L, N, large_decay=large_decay, with_zd=with_zd)
    low = _cast(base, dtype)
    # The reference sees exactly the values the backend sees (after rounding to its dtype).
    ref = {k: (None if v is None else v.detach().cpu().double().requires_grad_()) for k, v in low.items()}
    kw = dict(delta_softplus=softplus, return_last_state=True)
    y_ref, last_ref = selective_scan(**ref, **kw, backend="reference")
    extra = {"chunk_size": chunk} if backend in ("chunked", "triton", "triton_tiled") else {}
    from dis_dist.ops.selective_scan import BACKENDS

    y, last = BACKENDS[backend].scan(**low, **kw, **extra)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype
    assert _rel(y, y_ref) <= tol, ("y", _rel(y, y_ref))
    assert _rel(last, last_ref) <= tol, ("last", _rel(last, last_ref))
    g = torch.Generator().manual_seed(9)
    gy, gl = torch.randn(y_ref.shape, generator=g, dtype=F64), torch.randn(last_ref.shape, generator=g, dtype=F64)
    names = [n for n in NAMES if low[n] is not None]
    g_ref = torch.autograd.grad((y_ref * gy).sum() + (last_ref * gl).sum(), [ref[n] for n in names])
    g_low = torch.autograd.grad(
        (y.double() * gy.to(y.device)).sum() + (last.double() * gl.to(y.device)).sum(), [low[n] for n in names]
    )
    for name, a, r in zip(names, g_low, g_ref):
        assert a.dtype == low[name].dtype, name
        assert _rel(a, r) <= tol, (name, _rel(a, r))


@pytest.mark.parametrize("backend", ["chunked", "triton", "triton_tiled"])
@pytest.mark.parametrize("L", LENGTHS)
def test_backend_matches_reference_fp32(backend, L):
    _need(backend)
    _compare(backend, torch.float32, L, b=2 if L < 1000 else 1)


@pytest.mark.parametrize("backend", ["chunked", "triton", "triton_tiled"])
@pytest.mark.parametrize(
    "variant",
    [dict(softplus=False), dict(with_zd=False), dict(large_decay=True), dict(chunk=5), dict(chunk=1)],
    ids=["no-softplus", "no-z-no-D", "large-decay", "chunk5", "chunk1"],
)
def test_backend_variants(backend, variant):
    _need(backend)
    if backend == "triton_tiled" and variant.get("chunk") == 5:
        variant = dict(chunk=4)  # its tiles are powers of two
    _compare(backend, torch.float32, 13, **variant)


@pytest.mark.parametrize("backend", ["chunked", "triton", "triton_tiled"])
@pytest.mark.parametrize("L", [CHUNK + 1, pytest.param(258, marks=pytest.mark.slow)])
def test_backend_bf16_inputs(backend, L):
    _need(backend)
    _compare(backend, torch.bfloat16, L)


def test_chunked_float64_is_exact_to_rounding():
    _compare("chunked", F64, 37, chunk=6)


@pytest.mark.parametrize("backend", ["chunked", "triton", "triton_tiled"])
def test_bidirectional_backends_match_reference(backend):
    _need(backend)
    g = torch.Generator().manual_seed(4)
    b, d, N, L = 2, 6, 4, 19

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    base = [r(2, b, d, L), r(2, b, d, L) - 1, -torch.rand(2, d, N, generator=g, dtype=F64) - 0.1,
            r(2, b, N, L), r(2, b, N, L), r(2, d), r(b, d, L), r(2, d)]
    ref = [t.clone().requires_grad_() for t in base]
    low = [t.float().requires_grad_() for t in base]
    y_ref = bidirectional_selective_scan(*ref, True, backend="reference")
    y = bidirectional_selective_scan(*low, True, backend=backend)
    assert _rel(y, y_ref) <= 1e-5
    gy = torch.randn(y_ref.shape, generator=g, dtype=F64)
    for a, b_ in zip(torch.autograd.grad((y.double() * gy).sum(), low),
                     torch.autograd.grad((y_ref * gy).sum(), ref)):
        assert _rel(a, b_) <= 1e-5


def test_mixer_is_the_same_with_every_backend():
    """The DiS mixer gives the same output and gradients on every backend."""
    from dis_dist.models.mamba import BiMamba

    backends = ["reference", "chunked", "cpu"]
    backends += ["triton", "triton_tiled"] if importlib.util.find_spec("triton") else []
    mixer = BiMamba(24)
    h = torch.randn(2, 11, 24)
    results = {}
    for backend in backends:
        mixer.scan_backend = backend
        mixer.zero_grad()
        out = mixer(h)
        out.square().sum().backward()
        results[backend] = (out.detach(), torch.cat([p.grad.flatten() for p in mixer.parameters()]))
    out_ref, grad_ref = results.pop("reference")
    for backend, (out, grad) in results.items():
        assert _rel(out, out_ref.double()) <= 1e-5, backend
        assert _rel(grad, grad_ref.double()) <= 1e-5, backend


def test_cuda_backend_needs_a_gpu_and_says_so():
    from dis_dist.errors import BackendError
    from dis_dist.ops.selective_scan import AUTO_ORDER, resolve_backend

    assert AUTO_ORDER["cuda"] == ("cuda", "triton", "chunked") and AUTO_ORDER["cpu"] == ("cpu", "chunked")
    with pytest.raises(BackendError, match="cuda"):
        resolve_backend("cuda", torch.device("cpu"))
