"""The selective scan: the reference recurrence, the chunked backend against it, dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dis_dist.errors import BackendError
from dis_dist.ops.selective_scan import (
    available_backends,
    bidirectional_selective_scan,
    resolve_backend,
    selective_scan,
)
from dis_dist.ops.selective_scan.chunked import chunk_backward, chunk_forward

F64 = torch.float64


def _inputs(b=2, d=3, L=9, N=4, dtype=F64, scale_delta=1.0, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    t = dict(
        u=r(b, d, L), delta=r(b, d, L) * scale_delta, A=-torch.rand(d, N, generator=g, dtype=dtype) * 3,
        B=r(b, N, L), C=r(b, N, L), D=r(d), z=r(b, d, L), delta_bias=r(d), initial_state=r(b, d, N),
    )
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def _naive(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """The recurrence written out, one scalar formula per step."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = initial_state.clone()
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + u * D[:, None]
    return y * F.silu(z), h


def test_reference_matches_the_written_out_recurrence():
    t = _inputs(requires_grad=False)
    y, last = selective_scan(**t, delta_softplus=True, return_last_state=True, backend="reference")
    y0, last0 = _naive(**t)
    assert torch.allclose(y, y0, rtol=1e-12, atol=1e-12)
    assert torch.allclose(last, last0, rtol=1e-12, atol=1e-12)


def _graph_nodes(tensor):
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def test_reference_autograd_graph_is_linear_in_length():
    """No per-step slicing of a big tensor (whose backward materialises the whole tensor at
    every step: quadratic in L): no Select/Slice nodes, and a fixed number of nodes per step."""
    sizes = {}
    for L in (16, 64):
        y = selective_scan(**_inputs(L=L), delta_softplus=True, backend="reference")
        names = _graph_nodes(y)
        assert not [n for n in names if n.startswith(("SelectBackward", "SliceBackward"))]
        sizes[L] = len(names)
    per_step = (sizes[64] - sizes[16]) / 48
    assert per_step == int(per_step) and sizes[16] - 16 * per_step < 40


def test_chunked_gradcheck():
    from dis_dist.ops.selective_scan.chunked import selective_scan_chunked

    t = _inputs(b=1, d=2, L=6, N=3)
    names = list(t)

    def f(*args):
        kw = dict(zip(names, args))
        return selective_scan_chunked(**kw, delta_softplus=True, return_last_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(f, tuple(t[n] for n in names))


def test_bidirectional_is_forward_plus_reversed_scan():
    g = torch.Generator().manual_seed(1)
    b, d, L, N = 2, 3, 10, 4

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    u, delta, B, C = r(2, b, d, L), r(2, b, d, L), r(2, b, N, L), r(2, b, N, L)
    A, D, bias, z = -torch.rand(2, d, N, generator=g, dtype=F64), r(2, d), r(2, d), r(b, d, L)
    expected = 0
    for k, flip in ((0, False), (1, True)):
        def o(t, flip=flip):
            return t.flip(-1) if flip else t

        y = selective_scan(o(u[k]), o(delta[k]), A[k], o(B[k]), o(C[k]), D[k], None, bias[k], True,
                           backend="reference")
        expected = expected + o(y)
    expected = expected * F.silu(z)
    for backend in ("reference", "chunked"):
        got = bidirectional_selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), backend


@pytest.mark.parametrize("softplus", [True, False])
def test_chunk_kernels_are_consistent(softplus):
    """chunk_backward's gradients are those of chunk_forward under autograd, and padded steps
    (steps[i] = 0) are identity steps."""
    g = torch.Generator().manual_seed(2)
    S, d, N, T = (2,), 3, 4, 5

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64, requires_grad=True)

    u, delta, bias, D = r(T, *S, d), r(T, *S, d), r(d), r(d)
    A = (-torch.rand(d, N, generator=g, dtype=F64)).requires_grad_()
    B, C, h = r(T, *S, N), r(T, *S, N), r(*S, d, N)
    steps = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=F64)
    inputs = (u, delta, bias, A, B, C, D, h)
    y, h_end = chunk_forward(*inputs, steps, softplus)
    y3, h3 = chunk_forward(u[:3], delta[:3], bias, A, B[:3], C[:3], D, h, steps[:3], softplus)
    assert torch.allclose(h_end, h3, rtol=1e-14) and torch.allclose(y[:3], y3, rtol=1e-14)
    gy, gh = torch.randn_like(y), torch.randn_like(h_end)
    gy[3:] = 0  # padded outputs are discarded
    auto = torch.autograd.grad((y * gy).sum() + (h_end * gh).sum(), inputs)
    g_u, g_delta, g_B, g_C, g_bias, g_A, g_D, g_h = chunk_backward(
        *(t.detach() for t in inputs), steps, softplus, gy, gh
    )
    manual = (g_u, g_delta, g_bias.sum(0), g_A.sum(0), g_B, g_C, g_D.sum(0), g_h)
    for a, m in zip(auto, manual):
        assert torch.allclose(a, m, rtol=1e-12, atol=1e-12)


def test_dispatch_auto_env_and_errors(monkeypatch):
    monkeypatch.delenv("DIS_SCAN_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")).name == "cpu"
    monkeypatch.setenv("DIS_SCAN_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")).name == "reference"
    monkeypatch.setenv("DIS_SCAN_BACKEND", "nope")
    with pytest.raises(BackendError, match="DIS_SCAN_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    with pytest.raises(BackendError, match="choose one of"):
        resolve_backend("fastest", torch.device("cpu"))
    assert {"reference", "chunked", "cpu"} <= set(available_backends("cpu"))


@pytest.mark.slow
def test_compiled_chunk_kernels_match_eager(monkeypatch):
    """The torch.compile'd kernels (the default on CPU) compute what the eager ones do."""
    from dis_dist.ops.selective_scan import chunked

    t = _inputs(b=2, d=8, L=13, N=16, dtype=torch.float32, seed=5)
    args = dict(delta_softplus=True, return_last_state=True, chunk_size=4)
    names = list(t)
    results = []
    for mode in ("0", "1"):
        monkeypatch.setenv(chunked.COMPILE_ENV, mode)
        y, last = chunked.selective_scan_chunked(**t, **args)
        grads = torch.autograd.grad(y.square().sum() + last.sum(), [t[n] for n in names])
        results.append((y, last, grads))
    assert chunked._kernels.get("cpu") is not None and "cpu" not in chunked._compile_failed
    (y0, l0, g0), (y1, l1, g1) = results
    assert torch.allclose(y0, y1, rtol=1e-5, atol=1e-6) and torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(names, g0, g1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
