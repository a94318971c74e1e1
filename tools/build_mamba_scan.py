"""Build mamba-ssm's selective-scan CUDA extension (``selective_scan_cuda``) from its PyPI sdist.

For a GPU machine without network access or a mamba-ssm wheel: only ``csrc/selective_scan/`` is
taken from the sdist (``bash tools/gpu_deps.sh`` fetches it), none of mamba-ssm's Python
dependencies are installed, and only what DiS runs is compiled: fp32 and bf16 inputs with real
weights (mamba also builds fp16 inputs and complex weights: 10 translation units instead of 5,
each with twice the work in the forward ones), for one GPU architecture (sm_90 by default; mamba
builds seven). The dispatch of ``selective_scan.cpp`` is narrowed to match, so the link has no
undefined symbols; fp16 inputs or complex weights raise an error naming the type.

    python3 tools/build_mamba_scan.py .gpu_deps/mamba_ssm-2.3.2.post1.tar.gz --out /tmp/mamba_ext
    DIS_MAMBA_SCAN_EXT=/tmp/mamba_ext DIS_SCAN_BACKEND=cuda python3 ...

``--compile-only`` compiles object files with nvcc alone (no CUDA PyTorch or GPU needed): a check
of the sources against a new CUDA toolkit or PyTorch's headers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

EXT_NAME = "selective_scan_cuda"
SRC_DIR = "csrc/selective_scan/"
# The translation units DiS needs: the bindings, then forward and backward for fp32 and bf16
# inputs with real (fp32) weights.
SOURCES = (
    "selective_scan.cpp",
    "selective_scan_fwd_fp32.cu",
    "selective_scan_fwd_bf16.cu",
    "selective_scan_bwd_fp32_real.cu",
    "selective_scan_bwd_bf16_real.cu",
)
# mamba-ssm's setup.py nvcc flags, less "--threads 4" (it parallelises over -gencode targets, of
# which there is one) and "-std=c++17" (PyTorch >= 2.10 builds extensions as C++20, which its
# headers need; cpp_extension adds it).
NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "--ptxas-options=-v",
    "-lineinfo",
]
CXX_FLAGS = ["-O3"]

# selective_scan.cpp dispatches on fp16/bf16/fp32 inputs and fp32/complex64 weights; these
# replace its two dispatch macros, before their first use, with the types built here.
DISPATCH_PATCH = """\
// dis_dist (tools/build_mamba_scan.py): only fp32/bf16 inputs and real weights are compiled.
#undef DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16
#define DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16(ITYPE, NAME, ...)                      \\
    if (ITYPE == at::ScalarType::BFloat16) {                                          \\
        using input_t = at::BFloat16;                                                 \\
        __VA_ARGS__();                                                                \\
    } else if (ITYPE == at::ScalarType::Float) {                                      \\
        using input_t = float;                                                        \\
        __VA_ARGS__();                                                                \\
    } else {                                                                          \\
        TORCH_CHECK(false, #NAME " not implemented for input type '", toString(ITYPE), \\
                    "' (this build has float32 and bfloat16 only)");                   \\
    }
#undef DISPATCH_WTYPE_FLOAT_AND_COMPLEX
#define DISPATCH_WTYPE_FLOAT_AND_COMPLEX(WTYPE, NAME, ...)                            \\
    if (WTYPE == at::ScalarType::Float) {                                             \\
        using weight_t = float;                                                       \\
        __VA_ARGS__();                                                                \\
    } else {                                                                          \\
        TORCH_CHECK(false, #NAME " not implemented for weight type '", toString(WTYPE), \\
                    "' (this build has real float32 weights only)");                    \\
    }

"""
DISPATCH_ANCHOR = "std::vector<at::Tensor>\nselective_scan_fwd("
# The forward .cu files instantiate complex weights beside real ones; such lines are dropped.
COMPLEX_INSTANTIATION = re.compile(r"^template void selective_scan_fwd_cuda<[^>]*complex_t>.*$\n?", re.M)


class PrepareError(RuntimeError):
    """The sdist does not look like the mamba-ssm release this script was written for."""


def find_sdist(path: Path) -> Path:
    """The sdist itself, or the one mamba_ssm-*.tar.gz in a directory (tools/gpu_deps.sh's)."""
    if path.is_dir():
        found = sorted(path.glob("mamba_ssm-*.tar.gz"))
        if len(found) != 1:
            raise PrepareError(f"expected one mamba_ssm-*.tar.gz in {path}, found {[f.name for f in found]}")
        return found[0]
    if not path.is_file():
        raise PrepareError(f"{path} does not exist (fetch it with: bash tools/gpu_deps.sh)")
    return path


def _write_if_changed(path: Path, text: str) -> None:
    """Unchanged files keep their time stamps, so a second build is a no-op for ninja."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def patch_sources(files: dict[str, str]) -> dict[str, str]:
    """The pruned, patched text of each source or header DiS's build needs (by file name)."""
    out = {name: text for name, text in files.items() if not name.endswith(".cu") or name in SOURCES}
    missing = [name for name in SOURCES if name not in out]
    if missing:
        raise PrepareError(f"the sdist lacks {', '.join(missing)}")
    cpp = out["selective_scan.cpp"]
    if cpp.count(DISPATCH_ANCHOR) != 1 or "DISPATCH_WTYPE_FLOAT_AND_COMPLEX(A.scalar_type()" not in cpp:
        raise PrepareError("selective_scan.cpp's dispatch is not where this script expects it")
    out["selective_scan.cpp"] = cpp.replace(DISPATCH_ANCHOR, DISPATCH_PATCH + DISPATCH_ANCHOR)
    for name in ("selective_scan_fwd_fp32.cu", "selective_scan_fwd_bf16.cu"):
        out[name] = COMPLEX_INSTANTIATION.sub("", out[name])
        if not re.search(r"selective_scan_fwd_cuda<[^>]*, float>", out[name]):
            raise PrepareError(f"{name} instantiates no forward kernel with real weights")
    return out


def prepare(sdist: Path, dest: Path) -> list[Path]:
    """Extract ``csrc/selective_scan/`` from the sdist into ``dest``, pruned and patched;
    returns the sources to compile (the headers sit beside them)."""
    files: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            # <name>-<version>/csrc/selective_scan/<file>: nothing else, nothing nested
            if member.isfile() and len(parts) == 4 and "/".join(parts[1:3]) + "/" == SRC_DIR:
                files[parts[3]] = tar.extractfile(member).read().decode()
    if not files:
        raise PrepareError(f"{sdist} has no {SRC_DIR}")
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in patch_sources(files).items():
        _write_if_changed(dest / name, text)
    return [dest / name for name in SOURCES]


def arch_flags(arch: str) -> list[str]:
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build(sources: list[Path], out: Path, arch: str, verbose: bool) -> Path:
    """Compile and link with torch.utils.cpp_extension (ninja, MAX_JOBS = CPU count); returns the .so."""
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    from torch.utils.cpp_extension import load

    load(
        name=EXT_NAME,
        sources=[str(s) for s in sources],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS + arch_flags(arch),
        extra_include_paths=[str(sources[0].parent)],
        build_directory=str(out),
        with_cuda=True,
        verbose=verbose,
    )
    return out / f"{EXT_NAME}.so"


def compile_only(
    sources: list[Path], out: Path, arch: str, torch_include: Path | None = None
) -> list[tuple[str, float]]:
    """Compile each source to an object file as cpp_extension would (nvcc for .cu, the host
    compiler for .cpp), without linking: needs no CUDA PyTorch and no GPU. ``torch_include``:
    another PyTorch's headers (``torch/include`` unzipped from its wheel) instead of this one's.
    The seconds each took."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    nvcc = str(cuda_home / "bin" / "nvcc") if (cuda_home / "bin" / "nvcc").exists() else "nvcc"
    torch_includes = include_paths() if torch_include is None else [
        str(torch_include), str(torch_include / "torch" / "csrc" / "api" / "include")]
    includes = [str(sources[0].parent), *torch_includes, sysconfig.get_paths()["include"], str(cuda_home / "include")]
    macros = "c10/cuda/impl/cuda_cmake_macros.h"  # generated at PyTorch's build; CPU wheels lack it
    if not any((Path(i) / macros).exists() for i in includes):
        (out / "shim" / macros).parent.mkdir(parents=True, exist_ok=True)
        _write_if_changed(out / "shim" / macros, "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(out / "shim"))
    common = [f"-I{i}" for i in includes] + [f"-DTORCH_EXTENSION_NAME={EXT_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    out.mkdir(parents=True, exist_ok=True)
    times = []
    for src in sources:
        if src.suffix == ".cu":
            cmd = [nvcc, *common, *COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", "-std=c++20",
                   *NVCC_FLAGS, *arch_flags(arch), "-c", str(src), "-o", str(out / f"{src.stem}.cuda.o")]
        else:
            cmd = [os.environ.get("CXX", "c++"), *common, "-fPIC", "-std=c++20", *CXX_FLAGS,
                   "-c", str(src), "-o", str(out / f"{src.stem}.o")]
        t0 = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout + result.stderr)
            raise SystemExit(f"compiling {src.name} failed: {' '.join(cmd)}")
        times.append((src.name, time.perf_counter() - t0))
        warnings = sorted({line for line in (result.stdout + result.stderr).splitlines() if "warning" in line})
        print(f"compiled {src.name} in {times[-1][1]:.1f} s, {len(warnings)} distinct warnings", flush=True)
        for line in warnings[:5]:
            print(f"  {line}")
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sdist", type=Path, help="mamba_ssm-<version>.tar.gz, or the directory holding it (.gpu_deps)")
    p.add_argument("--out", type=Path, required=True, help="build directory; the .so is written here")
    p.add_argument("--arch", default="90", help="GPU architecture to compile for, as in sm_<ARCH> (default 90)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.add_argument("--prepare-only", action="store_true", help="extract and patch the sources, compile nothing")
    p.add_argument("--compile-only", nargs="*", metavar="FILE",
                   help="only compile these sources (default: all) to objects, no link (no CUDA PyTorch needed)")
    p.add_argument("--torch-include", type=Path,
                   help="with --compile-only: another PyTorch's headers (torch/include from its wheel)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        sources = prepare(find_sdist(args.sdist), args.out / "src")
    except (PrepareError, tarfile.TarError) as e:
        raise SystemExit(f"build_mamba_scan: {e}") from None
    print(f"sources in {sources[0].parent}: {', '.join(s.name for s in sources)}")
    if args.prepare_only:
        return 0
    if args.compile_only is not None:
        unknown = set(args.compile_only) - {s.name for s in sources}
        if unknown:
            p.error(f"--compile-only: not a source of this build: {', '.join(sorted(unknown))}")
        chosen = [s for s in sources if not args.compile_only or s.name in args.compile_only]
        compile_only(chosen, args.out, args.arch, args.torch_include)
        print(f"compiled in {time.perf_counter() - t0:.1f} s (no link)")
        return 0
    import torch

    if torch.version.cuda is None:
        raise SystemExit(f"build_mamba_scan: PyTorch {torch.__version__} has no CUDA; "
                         "--compile-only checks the sources without it")
    try:
        so = build(sources, args.out, args.arch, args.verbose)
    except (RuntimeError, OSError) as e:  # the compiler's or linker's errors, or no nvcc
        raise SystemExit(f"build_mamba_scan: building {EXT_NAME} failed (--verbose shows each command):\n{e}") from None
    print(f"built {so} in {time.perf_counter() - t0:.1f} s (MAX_JOBS={os.environ['MAX_JOBS']}, sm_{args.arch})")
    print(f"use it with: DIS_MAMBA_SCAN_EXT={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
