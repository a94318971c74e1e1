"""The mamba-ssm extension build (tools/build_mamba_scan.py) and the ``cuda`` backend's plumbing.

No GPU and no nvcc: the source preparation runs on a small fake sdist laid out as mamba-ssm's,
and the autograd function runs on CPU over a fake ``selective_scan_cuda`` that checks the
kernel's preconditions and computes with the reference.
"""

from __future__ import annotations

import importlib.util
import io
import tarfile
import types
from pathlib import Path

import pytest
import torch

from dis_dist.errors import BackendError
from dis_dist.ops.selective_scan import available_backends, cuda, resolve_backend
from dis_dist.ops.selective_scan.reference import selective_scan_ref

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_mamba_scan", ROOT / "tools" / "build_mamba_scan.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

# selective_scan.cpp as mamba-ssm 2.3.2 has it, cut to what the patch touches.
FAKE_CPP = """\
#include "selective_scan.h"
#define DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16(ITYPE, NAME, ...) \\
    if (ITYPE == at::ScalarType::Half) { using input_t = at::Half; __VA_ARGS__(); } \\
    else if (ITYPE == at::ScalarType::BFloat16) { using input_t = at::BFloat16; __VA_ARGS__(); } \\
    else if (ITYPE == at::ScalarType::Float) { using input_t = float; __VA_ARGS__(); }
#define DISPATCH_WTYPE_FLOAT_AND_COMPLEX(WTYPE, NAME, ...) \\
    if (WTYPE == at::ScalarType::Float) { using weight_t = float; __VA_ARGS__(); } \\
    else if (WTYPE == at::ScalarType::ComplexFloat) { using weight_t = c10::complex<float>; __VA_ARGS__(); }
std::vector<at::Tensor>
selective_scan_fwd(const at::Tensor &u) {
    DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16(u.scalar_type(), "selective_scan_fwd", [&] {
        DISPATCH_WTYPE_FLOAT_AND_COMPLEX(A.scalar_type(), "selective_scan_fwd", [&] {
            selective_scan_fwd_cuda<input_t, weight_t>(params, stream);
        });
    });
}
"""
HEADERS = ["selective_scan.h", "selective_scan_common.h", "static_switch.h", "reverse_scan.cuh",
           "uninitialized_copy.cuh", "selective_scan_fwd_kernel.cuh", "selective_scan_bwd_kernel.cuh"]


def _fwd_cu(itype: str) -> str:  # as in the sdist: real and complex weights, no newline at the end
    return (f'#include "selective_scan_fwd_kernel.cuh"\n\n'
            f"template void selective_scan_fwd_cuda<{itype}, float>(SSMParamsBase &params, cudaStream_t stream);\n"
            f"template void selective_scan_fwd_cuda<{itype}, complex_t>(SSMParamsBase &params, cudaStream_t stream);")


def _fake_sdist(path: Path, cpp: str = FAKE_CPP) -> Path:
    files = {"setup.py": "", "mamba_ssm/__init__.py": "", "csrc/selective_scan/selective_scan.cpp": cpp}
    files.update({f"csrc/selective_scan/{h}": f"// {h}\n" for h in HEADERS})
    for itype, name in (("float", "fp32"), ("at::Half", "fp16"), ("at::BFloat16", "bf16")):
        files[f"csrc/selective_scan/selective_scan_fwd_{name}.cu"] = _fwd_cu(itype)
        for weights in ("real", "complex"):
            files[f"csrc/selective_scan/selective_scan_bwd_{name}_{weights}.cu"] = f"// bwd {name} {weights}\n"
    files["csrc/other/selective_scan_fwd_fp32.cu"] = "// another kernel's file of the same name\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"mamba_ssm-9.9.9/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_prepare_keeps_fp32_and_bf16_real_and_narrows_the_dispatch(tmp_path: Path):
    sdist = _fake_sdist(tmp_path / "mamba_ssm-9.9.9.tar.gz")
    sources = build.prepare(build.find_sdist(tmp_path), tmp_path / "out" / "src")
    src = tmp_path / "out" / "src"
    assert [s.name for s in sources] == list(build.SOURCES)
    assert sorted(p.name for p in src.iterdir()) == sorted([*build.SOURCES, *HEADERS])
    # The forward files instantiate real weights only; the file from csrc/other/ was not taken.
    assert "complex_t" not in (src / "selective_scan_fwd_fp32.cu").read_text()
    assert (src / "selective_scan_fwd_bf16.cu").read_text().endswith(
        "template void selective_scan_fwd_cuda<at::BFloat16, float>(SSMParamsBase &params, cudaStream_t stream);\n")
    # The dispatch is redefined before its first use, with neither fp16 nor complex branches.
    cpp = (src / "selective_scan.cpp").read_text()
    patch = cpp[cpp.index("#undef DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16"):cpp.index(build.DISPATCH_ANCHOR)]
    assert cpp.index(patch) < cpp.index("DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16(u.scalar_type()")
    assert "BFloat16" in patch and "ScalarType::Float" in patch
    assert "Half" not in patch.replace("HALF", "") and "Complex" not in patch
    assert cpp.replace(build.DISPATCH_PATCH, "") == FAKE_CPP
    # A second run leaves the files alone (ninja then rebuilds nothing).
    stamps = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    build.prepare(sdist, src)
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == stamps


def test_prepare_refuses_sources_it_does_not_recognise(tmp_path: Path):
    sdist = _fake_sdist(tmp_path / "a.tar.gz", cpp=FAKE_CPP.replace("selective_scan_fwd(", "scan_fwd("))
    with pytest.raises(build.PrepareError, match="dispatch"):
        build.prepare(sdist, tmp_path / "src")
    with pytest.raises(build.PrepareError, match="gpu_deps.sh"):
        build.find_sdist(tmp_path / "missing.tar.gz")
    with pytest.raises(SystemExit, match="no csrc/selective_scan/"):
        empty = tmp_path / "empty"
        empty.mkdir()
        with tarfile.open(empty / "mamba_ssm-1.tar.gz", "w:gz"):
            pass
        build.main([str(empty), "--out", str(tmp_path / "o"), "--prepare-only"])


def test_cuda_backend_says_how_to_build_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert "CUDA" in cuda.unavailable(torch.device("cpu"))
    monkeypatch.setenv(cuda.ENV_VAR, str(tmp_path))  # a directory without the .so
    cuda.extension.cache_clear()
    try:
        reason = cuda.unavailable(torch.device("cuda"))
        assert "holds no selective_scan_cuda.so" in reason
        assert "tools/build_mamba_scan.py" in reason and cuda.ENV_VAR in reason
        (tmp_path / "selective_scan_cuda.so").write_bytes(b"not a shared library")
        cuda.extension.cache_clear()
        assert "cannot be loaded" in cuda.unavailable(torch.device("cuda"))
        # auto on the CPU never picks it, whatever the environment holds
        assert "cuda" not in available_backends("cpu")
        assert resolve_backend("auto", torch.device("cpu")).name != "cuda"
    finally:
        cuda.extension.cache_clear()


# A stand-in for selective_scan_cuda on CPU: mamba-ssm's fwd/bwd signatures and return tuples,
# the kernel's checks on layout and dtypes, the reference's values.
def _fake_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    _check(u, delta, A, B, C, D, z, delta_bias)
    out, last = selective_scan_ref(u, delta, A, B[:, 0], C[:, 0], D, None, delta_bias, delta_softplus,
                                   return_last_state=True)
    x = torch.stack([torch.zeros_like(last), last], -1).flatten(-2)[:, :, None]  # (b, d, 1 chunk, 2N)
    return [out, x] + ([out * torch.nn.functional.silu(z)] if z is not None else [])


def _fake_bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
    _check(u, delta, A, B, C, D, z, delta_bias)
    assert dout.stride(-1) == 1 and (z is None) == (out is None) and dz is None and not recompute_out_z
    leaves = [t.detach().requires_grad_() for t in (u, delta, A, B, C)]
    extra = [None if t is None else t.detach().requires_grad_() for t in (D, z, delta_bias)]
    with torch.enable_grad():
        y = selective_scan_ref(*leaves[:3], leaves[3][:, 0], leaves[4][:, 0], extra[0], extra[1], extra[2],
                               delta_softplus)
        wrt = leaves + [t for t in extra if t is not None]
        grads = iter(torch.autograd.grad(y, wrt, dout))
    du, ddelta, dA, dB, dC = (next(grads) for _ in range(5))
    dD, dz_, ddelta_bias = (None if t is None else next(grads) for t in extra)
    return [du, ddelta, dA, dB, dC, dD, ddelta_bias] + ([dz_] if z is not None else [])


def _check(u, delta, A, B, C, D, z, delta_bias):
    assert all(t.stride(-1) == 1 for t in (u, delta, B, C) + ((z,) if z is not None else ()))
    assert B.dim() == 4 and C.dim() == 4 and B.shape[1] == 1  # one group
    assert delta.dtype == B.dtype == C.dtype == u.dtype and (z is None or z.dtype == u.dtype)
    assert A.dtype == torch.float32 and all(t is None or t.dtype == torch.float32 for t in (D, delta_bias))


@pytest.mark.parametrize("gated", [False, True])
def test_autograd_function_calls_the_extension_as_mamba_does(monkeypatch: pytest.MonkeyPatch, gated: bool):
    fake = types.SimpleNamespace(fwd=_fake_fwd, bwd=_fake_bwd)
    monkeypatch.setattr(cuda, "extension", lambda: fake)
    g = torch.Generator().manual_seed(0)
    b, d, L, N = 2, 5, 9, 4
    # u, delta, z channels-last as the mixer hands them over (stride(-1) != 1); B, C fp64 -> u's dtype
    u, delta, z = (torch.randn(b, L, d, generator=g).transpose(1, 2) for _ in range(3))
    delta = delta * 0.5 - 1
    B, C = (torch.randn(b, N, L, generator=g, dtype=torch.float64) for _ in range(2))
    A, D, bias = -torch.rand(d, N, generator=g) - 0.1, torch.randn(d, generator=g), torch.randn(d, generator=g) * 0.3
    inputs = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z if gated else None, bias) if t is not None]
    refs = [t.clone().detach().requires_grad_() for t in inputs]

    def run(fn, ts):
        u, delta, A, B, C, D, *rest = ts
        return fn(u, delta, A, B, C, D, rest[0] if gated else None, rest[-1], True, return_last_state=True)

    y, last = run(cuda.selective_scan_cuda, inputs)
    y_ref, last_ref = run(selective_scan_ref, refs)
    assert y.dtype == torch.float32 and torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(last, last_ref)
    w = torch.randn(y.shape, generator=g)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for t, r in zip(inputs, refs):
        assert t.grad.dtype == t.dtype and torch.allclose(t.grad, r.grad, atol=1e-5), t.shape
    # A gradient through the last state is refused, not dropped.
    y, last = run(cuda.selective_scan_cuda, inputs)
    with pytest.raises(BackendError, match="last state"):
        (y.sum() + last.sum()).backward()
