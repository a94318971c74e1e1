#!/usr/bin/env python3
"""Benchmark the selective-scan backends against ``reference`` in one process.

Prints one table: backend, shape, dtype, forward ms, forward+backward ms, the scan's activation
memory (bytes it keeps for the backward pass beyond its inputs), and the ratios to
``reference`` measured in the same run (medians of ``--repeats`` rounds, each running every
backend once in turn). On a GPU it adds the memory floor: the bytes that must move (inputs read
once, outputs written once; in the backward pass the inputs and the output's gradient read, every
input's gradient written) over the measured copy bandwidth, and the times as multiples of it.
``--bidirectional`` times the DiS mixer's call instead of one direction: both directions, their
inputs as (forward, backward) pairs in the layouts the mixer's projections write; there the
``cuda-x1`` row is one call of mamba-ssm's kernel on one direction, and ``cuda`` is how the
official DiS code calls it (two calls, the second on flipped copies). ``--demo`` also times the
demo trainer (images/s) with each backend.

    python tools/bench_scan.py                       # CPU, fp32, every shape
    python tools/bench_scan.py --shapes dis-s2 --repeats 7 --demo
    python tools/bench_scan.py --device cuda --dtype bf16 --backends reference,chunked,triton
    python tools/bench_scan.py --device cuda --dtype bf16 --bidirectional --shapes dis-h2-256-b16,dis-h2-512-b16 \
        --backends triton_tiled,triton,cuda-x1,cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dis_dist.ops.selective_scan import (  # noqa: E402
    available_backends,
    bidirectional_selective_scan,
    selective_scan,
)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    d_inner: int
    length: int
    d_state: int = 16


SHAPES = {
    "dis-s2": Shape("DiS-S/2 32x32", 8, 736, 258),
    "dis-s2-1026": Shape("DiS-S/2 L=1026", 8, 736, 1026),
    "dis-h2-256": Shape("DiS-H/2 256px", 4, 3072, 258),
    "dis-h2-512": Shape("DiS-H/2 512px", 4, 3072, 1026),
    "dis-h2-256-b16": Shape("DiS-H/2 256px", 16, 3072, 258),
    "dis-h2-512-b16": Shape("DiS-H/2 512px", 16, 3072, 1026),
    "long": Shape("long L=4096", 2, 736, 4096),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Mamba-like inputs: softplus'd dt around 0.01-0.1, S4D-real A, unit-scale u, B, C, z.
    u, delta, z (b, d, L) and B, C (b, N, L) are views of (b, L, .) memory, as the DiS mixer's
    projections hand them to the scan."""
    g = torch.Generator().manual_seed(0)
    b, d, L, n = shape.batch, shape.d_inner, shape.length, shape.d_state

    def r(*s: int, scale: float = 1.0) -> torch.Tensor:  # (b, k, L) over (b, L, k) memory
        t = torch.randn(s[0], s[2], s[1], generator=g) * scale
        return t.to(device, dtype).transpose(1, 2).requires_grad_()

    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(device).requires_grad_()
    return dict(
        u=r(b, d, L), delta=r(b, d, L, scale=0.5), A=A, B=r(b, n, L), C=r(b, n, L),
        D=torch.ones(d, device=device, requires_grad=True), z=r(b, d, L),
        delta_bias=torch.full((d,), -3.0, device=device, requires_grad=True),
    )


def make_bidirectional_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[list, dict]:
    """(leaves, arguments) of the mixer's bidirectional call: u (b, d, L) contiguous per direction
    (the conv's output), delta a view of (b, L, d) memory (dt_proj's), B and C slices of one
    (b, L, dt_rank + 2N) x_proj output per direction, z a slice of the (b, L, 2d) in_proj output."""
    g = torch.Generator().manual_seed(0)
    b, d, L, n = shape.batch, shape.d_inner, shape.length, shape.d_state

    def leaf(*s: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*s, generator=g) * scale).to(device, dtype).requires_grad_()

    leaves = [
        *(leaf(b, d, L) for _ in range(2)),  # u
        *(leaf(b, L, d, scale=0.5) for _ in range(2)),  # delta
        *(leaf(b, L, -(-d // 32) + 2 * n) for _ in range(2)),  # x_dbl; DiS's dt_rank: ceil(d_inner / 32)
        leaf(b, L, 2 * d),  # in_proj
        -torch.arange(1, n + 1, dtype=torch.float32).repeat(2, d, 1).to(device).requires_grad_(),  # A
        torch.ones(2, d, device=device, requires_grad=True),  # D
        torch.full((2, d), -3.0, device=device, requires_grad=True),  # dt bias
    ]
    return leaves, bidirectional_arguments(leaves, n)


def bidirectional_arguments(leaves: list[torch.Tensor], n: int) -> dict:
    """The mixer's views of :func:`make_bidirectional_inputs`' leaves."""
    u0, u1, dl0, dl1, x0, x1, in_proj, A, D, bias = leaves
    d, rank = u0.shape[1], x0.shape[-1] - 2 * n
    return dict(
        u=(u0, u1), delta=(dl0.transpose(1, 2), dl1.transpose(1, 2)),
        B=tuple(t[..., rank:rank + n].transpose(1, 2) for t in (x0, x1)),
        C=tuple(t[..., rank + n:].transpose(1, 2) for t in (x0, x1)),
        A=A, D=D, z=in_proj[..., d:].transpose(1, 2), delta_bias=bias,
    )


def check(backends: list[str], shape: Shape, dtype: torch.dtype, device: torch.device) -> None:
    """Correct first: each backend's bidirectional output and every gradient against the float64
    reference on the CPU, on the same (rounded) values, as max |error| / max |reference|."""
    ref_out = None
    for backend in [b for b in backends if b not in ("reference", "cuda-x1")]:
        leaves, args = make_bidirectional_inputs(shape, dtype, device)
        if ref_out is None:
            ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
            ref_out = bidirectional_selective_scan(**bidirectional_arguments(ref_leaves, shape.d_state),
                                                   delta_softplus=True, backend="reference")
            grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            ref_grads = torch.autograd.grad((ref_out * grad).sum(), ref_leaves)
        out = bidirectional_selective_scan(**args, delta_softplus=True, backend=backend)
        grads = torch.autograd.grad((out.double() * grad.to(device)).sum(), leaves)

        def rel(a: torch.Tensor, r: torch.Tensor) -> float:
            a, r = a.detach().cpu().double(), r.detach()
            return float((a - r).abs().max() / r.abs().max().clamp_min(1e-30))

        errors = {name: rel(a, r) for name, a, r in zip(
            ("du0", "du1", "ddelta0", "ddelta1", "dx_dbl0", "dx_dbl1", "dz", "dA", "dD", "dbias"), grads, ref_grads)}
        worst = max(errors, key=errors.get)
        print(f"check {backend:<12} {shape.batch}x{shape.d_inner}x{shape.length} {str(dtype)[6:]}: "
              f"y {rel(out, ref_out):.2e}, worst gradient {worst} {errors[worst]:.2e}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def activation_bytes(fn, inputs: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass, inputs excluded."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in input_ptrs:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def _call(backend: str, shape: Shape, dtype: torch.dtype, device: torch.device, bidirectional: bool):
    """(leaves, run): the inputs that get gradients and a call of the scan on them."""
    if not bidirectional:
        inputs = make_inputs(shape, dtype, device)
        return list(inputs.values()), lambda: selective_scan(**inputs, delta_softplus=True, backend=backend)
    leaves, args = make_bidirectional_inputs(shape, dtype, device)
    if backend == "cuda-x1":  # one direction, as one call of mamba-ssm's kernel
        one = {k: (v[0] if k in ("u", "delta", "B", "C", "A", "D", "delta_bias") else v) for k, v in args.items()}
        return leaves, lambda: selective_scan(**one, delta_softplus=True, backend="cuda")
    return leaves, lambda: bidirectional_selective_scan(**args, delta_softplus=True, backend=backend)


def _runner(backend: str, shape: Shape, dtype: torch.dtype, device: torch.device, bidirectional: bool = False):
    """One timed repeat of ``backend``: returns (forward s, forward+backward s)."""
    inputs, run = _call(backend, shape, dtype, device, bidirectional)

    grad = torch.randn(shape.batch, shape.length, shape.d_inner, device=device, dtype=dtype).transpose(1, 2)

    def once() -> tuple[float, float]:
        for t in inputs:  # as an optimiser's zero_grad(set_to_none=True): nothing accumulates
            t.grad = None
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            run()
        _sync(device)
        t1 = time.perf_counter()
        run().backward(grad)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    once()  # warm-up (and compilation, for compiled kernels)
    return once, lambda: activation_bytes(run, inputs)


def time_backends(backends: list[str], shape: Shape, dtype: torch.dtype, device: torch.device,
                  repeats: int, bidirectional: bool = False) -> dict[str, dict]:
    """Medians over ``repeats`` rounds; each round runs every backend (and, on a CPU, the exp
    floor, as "exp floor") once, in turn, so that a noisy neighbour slows all of them alike
    rather than whichever was running."""
    runners = {b: _runner(b, shape, dtype, device, bidirectional) for b in backends}
    if device.type == "cpu":
        runners["exp floor"] = _exp_floor_runner(shape)
    times: dict[str, list[tuple[float, float]]] = {b: [] for b in runners}
    for _ in range(repeats):
        for b, (once, _) in runners.items():
            times[b].append(once())
    return {
        b: {
            "fwd_ms": statistics.median(t[0] for t in times[b]) * 1e3,
            "total_ms": statistics.median(t[1] for t in times[b]) * 1e3,
            "act_mb": runners[b][1]() / 2**20,
        }
        for b in runners
    }


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    x = torch.empty(256 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync(device)
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - t0)


def _exp_floor_runner(shape: Shape):
    """The CPU floor: ``torch.exp`` over one decay per (batch, channel, step, state), the
    exponentials one scan pass must evaluate (fp32, into a preallocated output)."""
    x = -torch.rand(shape.batch * shape.d_inner * shape.length * shape.d_state)
    out = torch.empty_like(x)
    torch.exp(x, out=out)

    def once() -> tuple[float, float]:
        t0 = time.perf_counter()
        torch.exp(x, out=out)
        return (time.perf_counter() - t0,) * 2

    return once, lambda: 0


def floor_ms(shape: Shape, dtype: torch.dtype, bandwidth: float, directions: int = 1,
             backward: bool = False) -> float:
    """The memory floor: per direction u, delta, B, C read once, z read and the output written
    once; with ``backward`` also the backward pass: the inputs and the output's gradient read,
    the gradients of u, delta, B, C (per direction) and z written."""
    item = torch.tensor([], dtype=dtype).element_size()
    b, d, L, n = shape.batch, shape.d_inner, shape.length, shape.d_state
    bdl, bnl = b * d * L, b * n * L
    per_pass = directions * (2 * bdl + 2 * bnl) + 2 * bdl  # inputs + z, and y (forward) or dy (backward)
    moved = per_pass + (per_pass + directions * (2 * bdl + 2 * bnl) + bdl if backward else 0)
    return moved * item / bandwidth * 1e3


def demo_throughput(backend: str, steps: int) -> float:
    """Images/s of the demo trainer (configs/demo_fmnist.yaml) over its second window of ``steps``."""
    from dis_dist.config import load_config
    from dis_dist.train.trainer import Trainer

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(root / "configs" / "demo_fmnist.yaml", [
            f"run_dir={tmp}", f"model.scan_backend={backend}", f"train.steps={2 * steps}",
            f"log.every={steps}", "sample.every=0", "checkpoint.every=0", "eval.every=0",
        ])
        trainer = Trainer(cfg)
        trainer.fit(resume="none", stop_at_step=2 * steps)
        return trainer.images_per_sec


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def parse_shape(key: str) -> Shape:
    """A named shape (SHAPES) or ``BxDxL`` (N = 16)."""
    if key in SHAPES:
        return SHAPES[key]
    try:
        b, d, length = (int(v) for v in key.lower().split("x"))
    except ValueError:
        sys.exit(f"unknown shape {key!r}: one of {', '.join(SHAPES)}, or BxDxL (e.g. 2x64x33)")
    return Shape(key, b, d, length)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=None,
                   help="comma-separated, 'reference' first, 'chunked' before the backends compared to it "
                        "(default: reference,chunked,cpu on a CPU; reference,chunked,triton on a GPU)")
    p.add_argument("--shapes", default="dis-s2,dis-s2-1026,dis-h2-256,dis-h2-512,long",
                   help=f"comma-separated of: {', '.join(SHAPES)}, or BxDxL (N = 16)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-reference-above", type=int, default=1026,
                   help="sequence length above which the reference is not run (minutes, GBs)")
    p.add_argument("--bidirectional", action="store_true",
                   help="time the mixer's bidirectional call (pairs in its layouts); 'cuda-x1' is one direction "
                        "through mamba-ssm's kernel, 'cuda' the official DiS's two calls with flips")
    p.add_argument("--check", default=None, metavar="BxDxL",
                   help="first compare every backend's bidirectional call with the float64 reference at this shape")
    p.add_argument("--demo", action="store_true", help="also time the demo trainer with each backend")
    p.add_argument("--demo-steps", type=int, default=30)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    default = "reference,chunked,cpu" if device.type == "cpu" else "reference,chunked,triton"
    backends = [b for b in (args.backends or default).split(",") if b]
    usable = set(available_backends(device)) | ({"cuda-x1"} if "cuda" in available_backends(device) else set())
    for b in backends:
        if b not in usable:
            sys.exit(f"backend {b!r} cannot run on {device}; available: {', '.join(sorted(usable))}")
    if args.check:
        check(backends, parse_shape(args.check), dtype, device)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    print(f"device {device} ({torch.get_num_threads()} threads), dtype {args.dtype}, "
          f"median of {args.repeats} rounds; activation memory = bytes saved for backward beyond the inputs")
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    cols = f"{'shape':<15} {'b x d x L':>16} {'backend':<12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'act MB':>9} " \
           f"{'x ref fwd':>9} {'x ref f+b':>9} {'ref/act':>8} {'x chunked f+b':>13}"
    if bandwidth:
        cols += f" {'floor ms':>9} {'fwd/floor':>9} {'f+b floor':>9} {'f+b/floor':>9}"
    else:
        cols += f" {'f+b/exp floor':>13}"
    print(cols)
    print("-" * len(cols))
    for key in args.shapes.split(","):
        shape = parse_shape(key)
        ref = chunked = None
        dims = f"{shape.batch}x{shape.d_inner}x{shape.length}"
        timed = [b for b in backends if not (b == "reference" and shape.length > args.skip_reference_above)]
        results = time_backends(timed, shape, dtype, device, args.repeats, args.bidirectional)
        exp_floor = results["exp floor"]["fwd_ms"] if "exp floor" in results else None
        for backend in backends:
            if backend not in results:
                print(f"{shape.name:<15} {dims:>16} {backend:<12} {'(skipped: --skip-reference-above)':>40}")
                continue
            r = results[backend]
            if backend == "reference":
                ref = r
            if backend == "chunked":
                chunked = r
            vs_chunked = f"{chunked['total_ms'] / r['total_ms']:.2f}x" if chunked else "-"
            speed_f = f"{ref['fwd_ms'] / r['fwd_ms']:.1f}x" if ref else "-"
            speed_t = f"{ref['total_ms'] / r['total_ms']:.1f}x" if ref else "-"
            mem = f"{ref['act_mb'] / max(r['act_mb'], 1e-9):.1f}x" if ref else "-"
            line = (f"{shape.name:<15} {dims:>16} {backend:<12} {_ms(r['fwd_ms']):>9} {_ms(r['total_ms']):>11} "
                    f"{r['act_mb']:>9.1f} {speed_f:>9} {speed_t:>9} {mem:>8} {vs_chunked:>13}")
            if bandwidth:
                directions = 2 if args.bidirectional and backend != "cuda-x1" else 1
                fl = floor_ms(shape, dtype, bandwidth, directions)
                fl_total = floor_ms(shape, dtype, bandwidth, directions, backward=True)
                line += f" {fl:>9.3f} {r['fwd_ms'] / fl:>9.1f} {fl_total:>9.3f} {r['total_ms'] / fl_total:>9.1f}"
            else:
                line += f" {r['total_ms'] / exp_floor:>13.2f}"
            print(line, flush=True)
        if exp_floor:
            print(f"{'':<15} exp floor {exp_floor:.1f} ms: torch.exp over b x d x L x N = "
                  f"{shape.batch * shape.d_inner * shape.length * shape.d_state / 1e6:.1f} M elements "
                  f"(one scan pass's decays)", flush=True)
    if args.demo:
        print(f"\ndemo trainer (configs/demo_fmnist.yaml), images/s over steps "
              f"{args.demo_steps + 1}-{2 * args.demo_steps}:")
        base = None
        for backend in backends:
            ips = demo_throughput(backend, args.demo_steps)
            base = base or ips
            print(f"  {backend:<12} {ips:8.1f} img/s   {ips / base:.2f}x {backends[0]}", flush=True)


if __name__ == "__main__":
    main()
