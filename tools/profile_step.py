#!/usr/bin/env python3
"""Profile training steps of a DiS under a strategy (the step tools/bench_train.py times) with
torch.profiler, and print where a step's time goes: wall against device-busy time, launches,
time by family (GEMM, scan, conv, norm/element-wise, optimizer+EMA, FSDP/comm, other) and the
top kernels.

    python tools/profile_step.py --model DiS-S/2 --strategy single --precision fp32 --micro-batch 4 --scan-backend cpu
    python tools/profile_step.py --model DiS-B/2 --strategy fsdp --micro-batch 32 --trace b2.json --json b2_summary.json
    torchrun --nproc_per_node 8 tools/profile_step.py --model DiS-H/2 --strategy fsdp --ckpt 1 --scan-backend triton

After ``--warmup`` steps, ``--steps`` steps run under the profiler, each inside its own range and
ended by a device synchronisation, so a step's wall time covers all of its work.

On a GPU: busy is the union of the intervals of GPU kernels and memory copies over the step's
wall time; launches are GPU kernels per step; a family's time is the summed time of its kernels
(summed over streams, so the families may add up to more than busy where communication
overlaps compute). Each kernel is attributed through the op that launched it and that op's
ranges: a kernel under the optimizer or EMA range, under FSDP's or a collective's range, or
inside a scan backend's autograd function belongs to that family whatever its own name.

On a CPU there are no kernels: busy is the time spent inside ops (the sum of their self times),
the rest of the wall being Python between ops; launches are the outermost aten ops per step (the
ops Python and autograd call, not what they call in turn); a family's time is the self time of
its ops and ranges, so nothing nested is counted twice, and the Python time of a range counts
in the range's family (that of ``forward+backward`` in other).

Under torchrun every rank profiles and rank 0 prints and writes ``--trace``/``--json`` (its own
profile); without it a lone process runs, with a process group of one where the strategy needs one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.autograd.profiler_util import FunctionEvent  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from dis_dist.ops.selective_scan import resolve_backend  # noqa: E402
from dis_dist.utils.cli import cli_main  # noqa: E402
from tools.train_step import add_step_args, build_train_step, describe, setup  # noqa: E402

FAMILIES = ("GEMM", "scan", "conv", "norm/element-wise", "optimizer+EMA", "FSDP/comm", "other")
STEP_RANGE = "profiled step "  # + its index: the range around each profiled step


def _word(*tokens: str) -> str:
    """Tokens that count only when no letter touches them: 'mul' in 'aten::mul_', not in 'multi'."""
    return "|".join(rf"(?<![a-z]){t}(?![a-z])" for t in tokens)


# (family, pattern on the lower-cased name), first match wins: collectives before the element-wise
# 'reduce', the optimizer's foreach kernels before 'mul', the scan kernels before 'fwd'/'bwd' of
# anything else, cuDNN's implicit-GEMM convolutions before GEMM, GEMM before 'add' of 'addmm'.
RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((family, re.compile(pattern)) for family, pattern in (
    ("FSDP/comm", r"nccl|gloo|c10d|fsdp::|all_?gather|reduce_?scatter|all_?reduce|record_param_comms|memcpy"
                  r"|chunk_cat|split_with_sizes_copy|gathersequence|halo_exchange|broadcast(?!_tensors|_to|_shapes)"),
    ("optimizer+EMA", r"optimizer|adam|foreach|multi_tensor_apply|lerp|update_ema|zero_grad|" + _word("ema")),
    ("scan", r"selective_?scan|_scan_|scan_cpu|scan_(fwd|bwd|forward|backward)|_(fwd|bwd)_kernel"
             r"|chunk_(forward|backward)|(cpu|chunked|triton)scan|_corrections|readout_"),
    ("conv", r"conv(?!ert)|depthwise|fprop|dgrad|wgrad"),
    ("GEMM", r"gemm|gemv|matmul|bmm|addmm|linear|cutlass|xmma|cublas|nvjet|s16816|s1688|wgmma|" + _word("mm")),
    ("norm/element-wise", r"norm|rms|elementwise|vectorized|unrolled|reduce|softplus|silu|sigmoid|tanh|gelu"
                          r"|sqrt|copy|fill|zero|where|clamp|cumsum|flip|rand|embedding|triton_(poi|red|per)|"
                          + _word("mul", "add", "sub", "div", "exp", "log", "pow", "neg", "abs", "cat", "sum",
                                  "mean", "clone", "index", "scatter", "gather", "softmax", "dropout")),
))
# Families that own all the work under them: a copy inside FSDP's all-gather is communication, an
# element-wise op inside a scan backend's autograd function is scan, anything under the optimizer
# or EMA range is optimizer+EMA (in this precedence).
OWNING = ("FSDP/comm", "scan", "optimizer+EMA")


def classify(name: str) -> str:
    """The family of one kernel, op or range, by its name alone (an autograd node by its op's:
    ``MmBackward0`` is GEMM)."""
    lowered = re.sub(r"^autograd::engine::evaluate_function: |backward\d*$", "", name.lower())
    return next((family for family, pattern in RULES if pattern.search(lowered)), "other")


def attribute(chain: Sequence[str]) -> str:
    """The family of a piece of work, given the names around it outermost first and its own last
    (ranges, ops, the launching op, the kernel): an owning family anywhere in the chain, else the
    family of the innermost name that has one."""
    families = [classify(name) for name in chain]
    for owner in OWNING:
        if owner in families:
            return owner
    return next((f for f in reversed(families) if f != "other"), "other")


# -- from profiler events to timed work ---------------------------------------------------------

@dataclass(frozen=True)
class Work:
    """One timed piece of a profile: a GPU kernel's duration, or a CPU event's self time."""

    name: str
    family: str
    start_us: float
    end_us: float
    time_us: float
    busy: bool  # device work (a kernel, or a CPU op rather than a range's Python time)
    launch: bool  # a GPU kernel, or an outermost aten op on CPU


def _chain(event: FunctionEvent | None) -> list[str]:
    """Names of ``event`` and the CPU events around it, outermost first."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names[::-1]


CPU = torch.autograd.DeviceType.CPU


def _activity(event: FunctionEvent) -> str | None:
    return getattr(event, "activity_type", None)  # newer PyTorch only, as is linked_correlation_id


def collect(events: Iterable[FunctionEvent], on_gpu: bool, links: Mapping[int, int] | None = None) -> list[Work]:
    """The work of a profile: on a GPU its kernels and memory copies, each attributed through the
    CPU op that launched it (``links``: a device event's id -> its op's id, where the events do not
    carry it: :func:`device_links`); on a CPU every event's self time."""
    events = [e for e in events if not e.is_async]
    if on_gpu:
        cpu = [e for e in events if e.device_type == CPU and _activity(e) not in ("cuda_runtime", "cuda_driver")]
        ops = {e.id: e for e in cpu}
        ranges = {e.name for e in cpu if getattr(e, "is_user_annotation", False)}  # mirrored on the GPU: not work
        work = []
        for e in events:
            if (e.device_type == CPU or getattr(e, "is_user_annotation", False) or e.name in ranges
                    or _activity(e) in ("gpu_user_annotation", "cuda_profiler_range")):
                continue
            op = ops.get(getattr(e, "linked_correlation_id", 0) or (links or {}).get(e.id, 0))
            start, end = e.time_range.start, e.time_range.end
            copy = _activity(e) in ("gpu_memcpy", "gpu_memset") or e.name.startswith(("Memcpy", "Memset"))
            work.append(Work(e.name, attribute([*_chain(op), e.name]), start, end, end - start, True, not copy))
        return work
    work = []
    for e in events:
        if e.device_type != CPU:
            continue
        chain = _chain(e)
        outermost_aten = e.name.startswith("aten::") and not any(n.startswith("aten::") for n in chain[:-1])
        work.append(Work(e.name, attribute(chain), e.time_range.start, e.time_range.end, e.self_cpu_time_total,
                         not e.is_user_annotation, outermost_aten))
    return work


def device_links(prof: profile) -> dict[int, int]:
    """Each device event's correlation id -> the id of the CPU op that launched it, from the raw
    results (for PyTorch versions whose events do not carry the link)."""
    return {k.correlation_id(): k.linked_correlation_id() for k in prof.profiler.kineto_results.events()
            if k.device_type() != CPU and k.linked_correlation_id() > 0}


def step_windows(events: Iterable[FunctionEvent]) -> list[tuple[float, float]]:
    """(start, end) in microseconds of each profiled step's range, in step order."""
    found = {int(e.name[len(STEP_RANGE):]): (e.time_range.start, e.time_range.end)
             for e in events if e.name.startswith(STEP_RANGE)}
    return [found[i] for i in sorted(found)]


# -- the summary ----------------------------------------------------------------------------------

@dataclass
class StepTimes:
    wall_us: float
    busy_us: float
    launches: int


@dataclass
class Summary:
    on_gpu: bool
    steps: list[StepTimes]
    families_us: dict[str, float]  # over all steps
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (name, calls, total us), most time first

    def mean(self, attr: str) -> float:
        return sum(getattr(s, attr) for s in self.steps) / len(self.steps)

    def to_json(self) -> dict:
        """Per-step means in milliseconds: what gpu_check.sh compares before and after a change."""
        n = len(self.steps)
        return {
            "device": "cuda" if self.on_gpu else "cpu", "steps": n,
            "wall_ms": round(self.mean("wall_us") / 1e3, 3), "busy_ms": round(self.mean("busy_us") / 1e3, 3),
            "busy": "union of GPU kernels" if self.on_gpu else "CPU op self time",
            "launches": round(self.mean("launches"), 1),
            "launch": "GPU kernels" if self.on_gpu else "outermost aten ops",
            "families_ms": {f: round(t / n / 1e3, 3) for f, t in self.families_us.items()},
            "total_ms": round(sum(self.families_us.values()) / n / 1e3, 3),
        }


def _union(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(work: Sequence[Work], windows: Sequence[tuple[float, float]], on_gpu: bool, top: int = 15) -> Summary:
    """Each piece of work counts in the step whose window it starts in; busy is the union of the
    busy work clipped to the window on a GPU, the sum of its (self) times on a CPU."""
    families = dict.fromkeys(FAMILIES, 0.0)
    by_name: dict[str, list[float]] = {}
    steps = []
    for start, end in windows:
        inside = [w for w in work if start <= w.start_us < end]
        busy = [w for w in inside if w.busy]
        if on_gpu:
            busy_us = _union([(w.start_us, min(w.end_us, end)) for w in busy])
        else:
            busy_us = sum(w.time_us for w in busy)
        steps.append(StepTimes(end - start, busy_us, sum(w.launch for w in inside)))
        for w in inside:
            families[w.family] += w.time_us
        for w in busy:
            calls_time = by_name.setdefault(w.name, [0, 0.0])
            calls_time[0] += 1
            calls_time[1] += w.time_us
    ranked = sorted(by_name.items(), key=lambda item: (-item[1][1], item[0]))[:top]
    return Summary(on_gpu, steps, families, [(name, int(c), t) for name, (c, t) in ranked])


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def report(summary: Summary) -> str:
    """The printed report: steps, families, top kernels."""
    gpu = summary.on_gpu
    n = len(summary.steps)
    lines = [
        "busy = " + ("union of GPU kernel and copy intervals; launches = GPU kernels" if gpu else
                     "time inside CPU ops (sum of op self times; the rest is Python between ops); "
                     "launches = outermost aten ops (CPU: no kernels)"),
        f"{'step':>5} {'wall ms':>10} {'busy ms':>10} {'busy':>7} {'launches':>9}",
    ]
    rows = [(str(i + 1), s.wall_us, s.busy_us, s.launches) for i, s in enumerate(summary.steps)]
    rows.append(("mean", summary.mean("wall_us"), summary.mean("busy_us"), summary.mean("launches")))
    for label, wall, busy, launches in rows:
        lines.append(f"{label:>5} {wall / 1e3:10.1f} {busy / 1e3:10.1f} {busy / wall:7.1%} {launches:9.0f}")
    total = sum(summary.families_us.values())
    kind = "kernel time, summed over streams" if gpu else "self time of ops and ranges"
    lines.append(f"time by family, ms per step ({kind}):")
    for family, t in summary.families_us.items():
        lines.append(f"  {family:<18} {t / n / 1e3:10.1f} {t / total if total else 0:7.1%}")
    lines.append(f"  {'total':<18} {total / n / 1e3:10.1f}   (mean wall {summary.mean('wall_us') / 1e3:.1f})")
    wall_total = sum(s.wall_us for s in summary.steps)
    lines.append(f"top {len(summary.top)} {'kernels' if gpu else 'ops (self time)'}:")
    lines.append(f"  {'name':<72} {'calls':>7} {'total ms':>9} {'of step':>8}")
    for name, calls, t in summary.top:
        lines.append(f"  {_short(name, 72):<72} {calls:7d} {t / 1e3:9.1f} {t / wall_total:8.1%}")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------

@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p, steps=3, warmup=3)
    p.add_argument("--scan-backend", default="auto", help="the scan backend (auto, cpu, chunked, triton, cuda, ...)")
    p.add_argument("--top", type=int, default=15, help="how many kernels to list")
    p.add_argument("--trace", metavar="PATH", help="write the Chrome trace (chrome://tracing, Perfetto) here")
    p.add_argument("--json", metavar="PATH", help="write the summary (per-step means in ms) here as JSON")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")

    cfg, env, spec = setup(args)
    on_gpu = env.device.type == "cuda"
    backend = resolve_backend(args.scan_backend, env.device).name  # an unknown or unavailable one: error here
    train = build_train_step(args, cfg, env, spec, backend)
    if env.is_main:
        print(f"{describe(args, env, spec)}, scan {backend}")
        print(f"profiling {args.steps} step(s) after {args.warmup} warm-up step(s)")
    for _ in range(args.warmup):
        train.step()
    train.sync()
    env.barrier()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for i in range(args.steps):
            with record_function(f"{STEP_RANGE}{i}"):
                train.step()
                train.sync()
    if env.is_main:
        events = prof.events()
        work = collect(events, on_gpu, device_links(prof) if on_gpu else None)
        summary = summarize(work, step_windows(events), on_gpu, args.top)
        print(report(summary))
        if args.trace:
            prof.export_chrome_trace(args.trace)
            print(f"trace: {args.trace}")
        if args.json:
            out = {"model": args.model, "latent": args.latent, "strategy": args.strategy,
                   "precision": args.precision, "micro_batch": args.micro_batch, "ckpt": args.ckpt,
                   "ranks": env.world_size, "scan_backend": backend, **summary.to_json()}
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
            print(f"summary: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
