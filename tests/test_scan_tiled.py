"""The ``triton_tiled`` scan (Triton's interpreter on CPU) beyond the shared backend tests of
tests/test_scan_backends.py: the mixer's layouts read in place, tile shapes that do not divide
the sequence or the channels, every output element written, bf16 pairs, its errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dis_dist.errors import BackendError
from dis_dist.ops.selective_scan import bidirectional_selective_scan
from tests.conftest import require

F64 = torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the reference stays on the CPU


@pytest.fixture(autouse=True)
def _triton() -> None:
    require(importlib.util.find_spec("triton") is not None, "triton (pip install triton)")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().cpu().double(), ref.detach().cpu().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _mixer_layout_inputs(b: int, d: int, L: int, N: int, dtype: torch.dtype, seed: int = 0):
    """Per-direction pairs laid out as the mixer hands them over: u contiguous (b, d, L) (the conv's
    output); delta over (b, L, d) memory (dt_proj's); B and C slices of one (b, L, R + 2N) x_proj
    output; z a slice of the in_proj output (b, L, 2d). Values in float64 (the reference's) and
    the same values in ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    base = {
        "u": [r(b, d, L) for _ in range(2)],
        "delta": [r(b, L, d).transpose(1, 2) * 0.5 - 1 for _ in range(2)],
        "x_dbl": [r(b, L, 3 + 2 * N) for _ in range(2)],
        "in_proj": r(b, L, 2 * d),
        "A": -torch.rand(2, d, N, generator=g, dtype=F64) - 0.1, "D": r(2, d), "delta_bias": r(2, d) * 0.3,
    }

    def views(t: dict, dt: torch.dtype) -> dict:
        dev = torch.device("cpu") if dt == F64 else DEVICE
        params = torch.float32 if dt == torch.bfloat16 else dt
        leaves = {
            "u": [x.to(dev, dt).requires_grad_() for x in t["u"]],
            # the same strides as in the mixer: a transposed view of channels-last memory
            "delta": [x.transpose(1, 2).to(dev, dt).requires_grad_() for x in t["delta"]],
            "x_dbl": [x.to(dev, dt).requires_grad_() for x in t["x_dbl"]],
            "in_proj": t["in_proj"].to(dev, dt).requires_grad_(),
            "A": t["A"].to(dev, params).requires_grad_(), "D": t["D"].to(dev, params).requires_grad_(),
            "delta_bias": t["delta_bias"].to(dev, params).requires_grad_(),
        }
        args = {
            "u": tuple(leaves["u"]), "delta": tuple(x.transpose(1, 2) for x in leaves["delta"]),
            "B": tuple(x[..., 3:3 + N].transpose(1, 2) for x in leaves["x_dbl"]),
            "C": tuple(x[..., 3 + N:].transpose(1, 2) for x in leaves["x_dbl"]),
            "z": leaves["in_proj"][..., d:].transpose(1, 2),
            "A": leaves["A"], "D": leaves["D"], "delta_bias": leaves["delta_bias"],
        }
        return leaves, args

    return views(base, F64), views(base, dtype)


def _flat_leaves(leaves: dict) -> list[torch.Tensor]:
    out = []
    for v in leaves.values():
        out.extend(v if isinstance(v, list) else [v])
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_mixer_layouts_are_read_in_place_and_match_the_reference(dtype, tol):
    """Pairs with the mixer's strides: no copies on the way in (the kernel keeps the very tensors
    it was given), the output over channels-last memory (out_proj reads it without a copy), the
    output and every gradient within tolerance of the float64 reference."""
    (ref_leaves, ref_args), (leaves, args) = _mixer_layout_inputs(2, 6, 19, 4, dtype)
    y_ref = bidirectional_selective_scan(**ref_args, delta_softplus=True, backend="reference")
    y = bidirectional_selective_scan(**args, delta_softplus=True, backend="triton_tiled")
    assert y.dtype == dtype and y.transpose(1, 2).is_contiguous()
    assert _rel(y, y_ref) <= tol
    saved = {t.data_ptr() for t in y.grad_fn.saved_tensors if t is not None}
    for name in ("u", "delta", "B", "C"):
        assert {t.data_ptr() for t in args[name]} <= saved, name
    assert args["z"].data_ptr() in saved
    gy = torch.randn(y_ref.shape, dtype=F64)
    grads = torch.autograd.grad((y.double() * gy.to(DEVICE)).sum(), _flat_leaves(leaves))
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), _flat_leaves(ref_leaves))
    for a, r in zip(grads, grads_ref):
        assert _rel(a, r) <= tol


@pytest.mark.parametrize("tile,block_d", [(1, 8), (2, 4), (8, 16), (32, 2)])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "one-direction"])
def test_tile_shapes_that_do_not_divide_the_sequence_or_channels(tile, block_d, bidirectional, monkeypatch):
    """Every tile shape computes the same function; outputs are allocated NaN-filled, so an
    element a kernel failed to write would show."""
    from dis_dist.ops.selective_scan import BACKENDS, triton_tiled

    monkeypatch.setattr(triton_tiled, "_empty", lambda *s, **kw: torch.full(s, float("nan"), **kw))
    g = torch.Generator().manual_seed(tile * 7 + block_d)
    b, d, L, N = 2, 5, 11, 4

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    if bidirectional:
        base = [r(2, b, d, L), r(2, b, d, L) - 1, -torch.rand(2, d, N, generator=g, dtype=F64) - 0.1,
                r(2, b, N, L), r(2, b, N, L), r(2, d), r(b, d, L), r(2, d)]
    else:
        base = [r(b, d, L), r(b, d, L) - 1, -torch.rand(d, N, generator=g, dtype=F64) - 0.1,
                r(b, N, L), r(b, N, L), r(d), r(b, d, L), r(d), r(b, d, N)]
    ref = [t.clone().requires_grad_() for t in base]
    low = [t.to(DEVICE, torch.float32).requires_grad_() for t in base]
    kw = dict(delta_softplus=True)
    if bidirectional:
        y_ref = BACKENDS["reference"].bidirectional(*ref, **kw)
        y = BACKENDS["triton_tiled"].bidirectional(*low, **kw, chunk_size=tile, block_d=block_d)
        loss_ref, loss = y_ref.square().sum(), y.double().square().sum().cpu()
    else:
        y_ref, last_ref = BACKENDS["reference"].scan(*ref[:8], **kw, initial_state=ref[8], return_last_state=True)
        y, last = BACKENDS["triton_tiled"].scan(*low[:8], **kw, initial_state=low[8], return_last_state=True,
                                                chunk_size=tile, block_d=block_d)
        assert _rel(last, last_ref) <= 1e-5
        loss_ref = y_ref.square().sum() + last_ref.sum()
        loss = (y.double().square().sum() + last.double().sum()).cpu()
    assert not y.isnan().any() and _rel(y, y_ref) <= 1e-5
    for a, r_ in zip(torch.autograd.grad(loss, low), torch.autograd.grad(loss_ref, ref)):
        assert not a.isnan().any() and _rel(a, r_) <= 1e-5


def test_what_it_cannot_do_is_an_error(monkeypatch):
    from dis_dist.ops.selective_scan import BACKENDS
    from dis_dist.ops.selective_scan.triton_tiled import tile_config

    scan = BACKENDS["triton_tiled"].scan
    u = torch.randn(1, 4, 5)
    with pytest.raises(BackendError, match="power of two"):
        scan(u, u, -torch.rand(4, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    with pytest.raises(BackendError, match="float64"):
        scan(u.double(), u.double(), -torch.rand(4, 4).double(), torch.randn(1, 4, 5).double(),
             torch.randn(1, 4, 5).double())
    with pytest.raises(BackendError, match="powers of two"):
        tile_config(torch.device("cpu"), tile=6)
    monkeypatch.setenv("DIS_SCAN_TILE", "16,32")
    with pytest.raises(BackendError, match="DIS_SCAN_TILE"):
        tile_config(torch.device("cpu"))
    monkeypatch.setenv("DIS_SCAN_TILE", "32,16,4")
    assert tile_config(torch.device("cpu")) == (32, 16, 4)
    assert tile_config(torch.device("cpu"), tile=4) == (4, 16, 4)


def test_without_gradients_it_keeps_nothing_and_gives_the_same_outputs():
    """Sampling: no states kept for a backward pass, and the same outputs as with them."""
    (_, _), (_, args) = _mixer_layout_inputs(2, 6, 13, 4, torch.float32, seed=3)
    y = bidirectional_selective_scan(**args, delta_softplus=True, backend="triton_tiled")
    with torch.no_grad():
        y_sampling = bidirectional_selective_scan(**args, delta_softplus=True, backend="triton_tiled")
    assert torch.equal(y.detach(), y_sampling) and y_sampling.grad_fn is None
    assert y.grad_fn.saved_tensors[12].numel() > 1  # the tile states, kept for the backward pass


def test_bench_scan_times_the_mixers_bidirectional_call(capsys):
    """tools/bench_scan.py --bidirectional: a row per backend, the kept bytes of each, and the
    memory floor counting 6 (b, d, L) tensors forward (4 inputs, z, y) and 17 forward+backward."""
    from tools.bench_scan import Shape, floor_ms, main

    main(["--bidirectional", "--shapes", "2x16x9", "--backends", "reference,cpu,triton_tiled", "--repeats", "1",
          "--check", "2x8x11"])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[2]: line.split() for line in out if line.startswith("2x16x9")}
    assert set(rows) == {"reference", "cpu", "triton_tiled"}
    checks = {line.split()[1]: line for line in out if line.startswith("check ")}
    assert set(checks) == {"cpu", "triton_tiled"}
    for line in checks.values():  # "... y 1.2e-07, worst gradient dA 3.4e-07": fp32 within 1e-5
        assert float(line.split()[5].rstrip(",")) < 1e-5 and float(line.split()[-1]) < 1e-5
    assert float(rows["triton_tiled"][5]) < float(rows["reference"][5])  # act MB: tile states vs every step's
    one = Shape("unit", 1, 1, 1, d_state=0)
    assert floor_ms(one, torch.float32, 4e3, directions=2) == 6.0
    assert floor_ms(one, torch.float32, 4e3, directions=2, backward=True) == 17.0
