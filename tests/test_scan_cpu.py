"""The native CPU backend (C++, built on first use) against the reference, and how ``auto`` picks it.

Float64 runs through the same kernel code as float32 (8 lanes instead of 16, std::exp instead of
the vectorised exponential), so it checks the algorithm to rounding: every output and gradient
within 1e-10 of the reference, at every odd length up to 299 (chunks of 32 and of 7, so lengths
cross chunk boundaries many ways), with initial states and both directions. Float32 checks the
fast path (16 states, 16-channel blocks, the vectorised exp and softplus) to the documented 1e-5.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn.functional as F

from dis_dist.ops.selective_scan import BACKENDS, bidirectional_selective_scan, resolve_backend, selective_scan
from dis_dist.ops.selective_scan import cpu as cpu_backend
from dis_dist.ops.selective_scan.cpu import depthwise_conv_silu_cpu

F64 = torch.float64
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _built():
    reason = cpu_backend.unavailable(CPU)
    assert reason is None, f"the native CPU kernel must build here: {reason}"


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _single_inputs(b, d, L, N, dtype, g):
    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=F64) * scale).to(dtype)

    return dict(
        u=r(b, d, L), delta=r(b, d, L, scale=0.5) - 1.0,
        A=(-torch.rand(d, N, generator=g, dtype=F64) * 2 - 0.1).to(dtype),
        B=r(b, N, L), C=r(b, N, L), D=r(d), z=r(b, d, L), delta_bias=r(d, scale=0.3), initial_state=r(b, d, N),
    )


def _check_single(inputs: dict, tol: float, chunk: int | None = None) -> float:
    """Values, last state and every gradient of the cpu backend against the reference (in fp64)."""
    low = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref = {k: v.double().requires_grad_() for k, v in inputs.items()}
    y_ref, last_ref = selective_scan(**ref, delta_softplus=True, return_last_state=True, backend="reference")
    y, last = BACKENDS["cpu"].scan(**low, delta_softplus=True, return_last_state=True, chunk_size=chunk)
    assert y.dtype == inputs["u"].dtype and y.shape == y_ref.shape and last.shape == last_ref.shape
    g = torch.Generator().manual_seed(1)
    gy, gl = torch.randn(y_ref.shape, generator=g, dtype=F64), torch.randn(last_ref.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad((y.double() * gy).sum() + (last.double() * gl).sum(), list(low.values()))
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (last_ref * gl).sum(), list(ref.values()))
    errors = {"y": _rel(y, y_ref), "last": _rel(last, last_ref)}
    errors.update({f"d{k}": _rel(a, b) for k, a, b in zip(low, grads, grads_ref)})
    worst = max(errors.values())
    assert worst <= tol, errors
    return worst


def _check_bidirectional(b, d, L, N, dtype, tol, g, chunk=None) -> None:
    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64).to(dtype)

    base = [r(2, b, d, L), r(2, b, d, L) - 1, (-torch.rand(2, d, N, generator=g, dtype=F64) - 0.1).to(dtype),
            r(2, b, N, L), r(2, b, N, L), r(2, d), r(b, d, L), r(2, d)]
    low = [t.clone().requires_grad_() for t in base]
    ref = [t.double().requires_grad_() for t in base]
    y_ref = bidirectional_selective_scan(*ref, True, backend="reference")
    y = BACKENDS["cpu"].bidirectional(*low, delta_softplus=True, chunk_size=chunk)
    assert _rel(y, y_ref) <= tol, ("y", L)
    gy = torch.randn(y_ref.shape, generator=g, dtype=F64)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name, a, b_ in zip(names, torch.autograd.grad((y.double() * gy).sum(), low),
                           torch.autograd.grad((y_ref * gy).sum(), ref)):
        assert _rel(a, b_) <= tol, (name, L, _rel(a, b_))


@pytest.mark.parametrize("chunk", [None, 7])
def test_float64_equals_the_reference_at_every_odd_length(chunk):
    g = torch.Generator().manual_seed(0)
    for L in range(1, 300, 2):
        # 19 channels: one full 8-lane fp64 block and a partial one; 3 states: the generic path
        _check_single(_single_inputs(2, 19, L, 3, F64, g), 1e-10, chunk)
        _check_bidirectional(1, 19, L, 3, F64, 1e-10, g, chunk)


def test_float64_with_sixteen_states_and_long_sequences():
    g = torch.Generator().manual_seed(1)
    for L in (33, 299, 1025):
        _check_single(_single_inputs(2, 9, L, 16, F64, g), 1e-10)
        _check_bidirectional(2, 9, L, 16, F64, 1e-10, g)


@pytest.mark.parametrize("L", [1, 31, 258, 1026])
def test_float32_fast_path_within_tolerance(L):
    """16 states and 16-channel blocks (the vectorised path) plus a partial block of 5 channels."""
    g = torch.Generator().manual_seed(2)
    _check_single(_single_inputs(2, 37, L, 16, torch.float32, g), 1e-5)
    _check_bidirectional(2, 37, L, 16, torch.float32, 1e-5, g)


def test_large_decays_and_the_softplus_threshold():
    """exp(delta A) far below fp32's normal range (becomes 0) and delta past softplus's threshold of
    20 (where torch's softplus is the identity, slope exactly 1)."""
    g = torch.Generator().manual_seed(3)
    inputs = _single_inputs(2, 21, 40, 16, F64, g)
    inputs["delta"] = inputs["delta"] * 15 + 8  # softplus inputs from about -40 to 60
    inputs["A"] = inputs["A"] * 30
    _check_single(inputs, 1e-10)
    _check_single({k: v.float() for k, v in inputs.items()}, 1e-5)


def test_bf16_inputs_compute_in_float32():
    g = torch.Generator().manual_seed(4)
    inputs = _single_inputs(2, 16, 50, 16, torch.float32, g)
    low = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    y = selective_scan(**low, delta_softplus=True, backend="cpu")
    y_ref = selective_scan(**{k: v.float() for k, v in low.items()}, delta_softplus=True, backend="reference")
    assert y.dtype == torch.bfloat16
    assert _rel(y, y_ref) <= 1e-2


def test_the_scan_keeps_only_chunk_boundaries_for_backward():
    """Saved for backward: the inputs themselves (no copies when they are channels-last views, as the
    mixer hands them) and the states at chunk boundaries, L / 32 x N per channel."""
    b, d, L, N = 2, 32, 256, 16
    u = torch.randn(b, L, d).transpose(1, 2).requires_grad_()
    delta = torch.randn(b, L, d).transpose(1, 2).requires_grad_()
    B, C = (torch.randn(b, L, N).transpose(1, 2).requires_grad_() for _ in range(2))
    A = -torch.rand(d, N).requires_grad_()
    inputs = {u.untyped_storage().data_ptr() for u in (u, delta, B, C)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(u, delta, A, B, C, delta_softplus=True, backend="cpu")
    small = 2 * d * N * 4 + d * 4 * 2  # A transposed, D and delta bias zeros
    assert sum(saved.values()) <= b * (L // 32) * N * d * 4 + small


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_native_conv_silu_equals_conv1d(dtype):
    """The mixer's two depthwise convs with their SiLU (the causal one, and the reversed branch's
    anti-causal one with the kernel flipped) from a channels-last view, values and gradients,
    against F.conv1d and F.silu."""
    g = torch.Generator().manual_seed(5)
    b, d, L, K = 2, 37, 11, 4
    x = torch.randn(b, L, 2 * d, generator=g, dtype=dtype)[..., :d].transpose(1, 2).requires_grad_()
    w = torch.randn(2, d, K, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(2, d, generator=g, dtype=dtype, requires_grad=True)
    causal = F.conv1d(x, w[0, :, None], bias[0], padding=K - 1, groups=d)[..., :L]
    anti = F.conv1d(x, w[1, :, None].flip(-1), bias[1], padding=K - 1, groups=d)[..., K - 1:]
    ref = F.silu(torch.stack([causal, anti]))
    out = depthwise_conv_silu_cpu(x, w, bias)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert out.shape == ref.shape == (2, b, d, L) and _rel(out, ref) <= tol
    assert out.transpose(-1, -2).is_contiguous()  # the scan's channels-last layout, as it reads it
    go = torch.randn(ref.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad((out * go).sum(), [x, w, bias])
    for a, r in zip(grads, torch.autograd.grad((ref * go).sum(), [x, w, bias])):
        assert _rel(a, r) <= tol


def test_native_silu_is_within_a_few_ulp_with_the_specials_of_torch():
    """The kernel's exp (in SiLU, softplus and the z gate), through the conv with zero weights
    and the values as biases: within 5 ulp of SiLU where fp32 holds exp(-x) (x >= -87), below
    1e-30 under it, and -inf, inf, NaN as torch has them."""
    values = torch.cat([torch.linspace(-120, 100, 100_003), torch.tensor([float("-inf"), float("inf"), float("nan")])])
    d = values.numel()
    got = depthwise_conv_silu_cpu(torch.zeros(1, d, 1), torch.zeros(2, d, 4), torch.stack([values, values]))
    want = F.silu(values.double())
    for out in got[:, 0, :, 0]:
        assert torch.equal(out.isnan(), want.isnan())  # -inf * 0 and NaN
        held = values.isfinite() & (values >= -87)
        assert ((out.double()[held] - want[held]).abs() / want[held].abs().clamp_min(1e-300)).max() <= 5 * 2**-24
        assert (out[values.isfinite() & (values < -87)].abs() < 1e-30).all()
        assert out[-2] == float("inf")


def _graph_ops(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind t."""
    seen, todo = {}, [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            todo.extend(next_fn for next_fn, _ in node.next_functions)
    return set(seen.values())


def test_mixer_with_the_cpu_backend_equals_the_reference():
    """BiMamba on the cpu backend (both convs and their SiLU in the native kernel, the branches'
    projections batched, the fused bidirectional scan) against the reference backend, in
    float64: output and every parameter gradient."""
    from dis_dist.models.mamba import BiMamba

    torch.manual_seed(0)
    mixer = BiMamba(24).double()
    h = torch.randn(2, 19, 24, dtype=F64)
    results = {}
    for backend in ("reference", "cpu"):
        mixer.scan_backend = backend
        mixer.zero_grad()
        out = mixer(h)
        assert ("_CpuConvSiluBackward" in _graph_ops(out)) == (backend == "cpu")
        out.square().sum().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in mixer.parameters()])
    assert _rel(results["cpu"][0], results["reference"][0]) <= 1e-12
    for (name, _), a, b in zip(mixer.named_parameters(), results["cpu"][1], results["reference"][1]):
        assert _rel(a, b) <= 1e-10, name


def test_auto_picks_the_native_kernel_on_cpu():
    assert resolve_backend("auto", CPU).name == "cpu"


def test_without_a_compiler_auto_falls_back_to_chunked_and_says_why(monkeypatch, caplog):
    from dis_dist.errors import BackendError

    dispatch = importlib.import_module("dis_dist.ops.selective_scan")  # the package (its function shadows it)

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    for cache in (cpu_backend._build, dispatch._unavailable):
        cache.cache_clear()
    monkeypatch.setattr(dispatch, "_logged", set())
    try:
        with caplog.at_level(logging.INFO, logger="dis_dist.ops.selective_scan"):
            assert resolve_backend("auto", CPU).name == "chunked"
        lines = [r.getMessage() for r in caplog.records if "selective-scan backend" in r.getMessage()]
        assert len(lines) == 1 and "not cpu: no C++ compiler" in lines[0], lines
        with pytest.raises(BackendError, match="no C\\+\\+ compiler"):
            resolve_backend("cpu", CPU)
    finally:
        monkeypatch.undo()
        for cache in (cpu_backend._build, dispatch._unavailable):
            cache.cache_clear()
    assert resolve_backend("auto", CPU).name == "cpu"
