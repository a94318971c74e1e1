#!/usr/bin/env python3
"""Context parallelism on CPU ranks: per-rank activation memory and step time of DiS-S-shaped
blocks on one long sequence, each sample's tokens split over k ranks, against k = 1 (the whole
sequence in one process) on the same total cores.

    python tools/bench_cp.py                       # L = 4098 (128x128 latents, patch 2), k = 1, 2, 4
    python tools/bench_cp.py --input-size 64 --ks 1 2 --repeats 1

Each configuration runs in its own ``torchrun`` (k ranks x cores/k threads, at least 1), and the
configurations take turns ``--repeats`` times; the table holds medians. A step is one forward
and backward pass of a batch (no optimiser). Per rank:
  saved act    bytes the forward keeps for the backward (each storage once, parameters excluded:
               what the planner's ACT_BYTES models, dis_dist.plan.saved_activation_bytes)
  peak act     the rank's peak resident memory during a step above its resident memory before it
               (VmHWM reset at the step's start): the saved activations, the transient ones and the
               gradients of the parameters (the same at every k)
The target of issue 15: saved (and peak) activation memory per rank <= 1.2/k of k = 1's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULT = "BENCH_CP "  # the line rank 0 prints its measurements on


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from dis_dist.distributed.env import bound_host_heap
    from dis_dist.models.dis import DiS
    from dis_dist.ops.selective_scan.context_parallel import slice_bounds
    from dis_dist.plan import saved_activation_bytes

    k = int(os.environ.get("WORLD_SIZE", "1"))
    if k > 1:
        dist.init_process_group("gloo")
    bound_host_heap()
    torch.set_num_threads(args.threads)
    model = DiS(input_size=args.input_size, patch_size=2, in_channels=4, width=args.width, depth=args.depth,
                num_classes=1000, scan_backend=args.backend)
    if k > 1:
        model.set_context_parallel(dist.group.WORLD)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    saved = saved_activation_bytes(model, args.batch, "fp32")
    seconds, peaks = [], []
    for step in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)
        gc.collect()
        if k > 1:
            dist.barrier()
        before = _status_kb("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        model(x, t, y).square().mean().backward()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
            peaks.append((_status_kb("VmHWM:") - before) * 1024)
    mine = {"saved": saved, "peak": max(peaks), "seconds": statistics.median(seconds)}
    everyone = [mine]
    if k > 1:
        everyone = [None] * k
        dist.all_gather_object(everyone, mine)
    if int(os.environ.get("RANK", "0")) == 0:
        lengths = [end - start for start, end in (slice_bounds(model.num_tokens, k, r) for r in range(k))]
        print(RESULT + json.dumps({"ranks": everyone, "tokens": model.num_tokens, "longest": max(lengths)}), flush=True)
    if k > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(args: argparse.Namespace, k: int) -> dict:
    threads = max(1, args.cores // k)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}", __file__,
           "--worker", "--threads", str(threads), "--input-size", str(args.input_size), "--width", str(args.width),
           "--depth", str(args.depth), "--batch", str(args.batch), "--backend", args.backend,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if not lines:
        sys.exit(f"k={k} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    if proc.returncode:  # measured, then a rank died leaving (seen: gloo's teardown aborting)
        print(f"warning: k={k} exited with {proc.returncode} after reporting its measurements:\n"
              f"{proc.stderr[-1500:]}", file=sys.stderr)
    out = json.loads(lines[-1][len(RESULT):])
    out["threads"] = threads
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4],
                   help="context-parallel sizes (1 first: the baseline)")
    p.add_argument("--input-size", type=int, default=128, help="latent side; patch 2: (side/2)^2 + 2 tokens")
    p.add_argument("--width", type=int, default=368, help="DiS-S's width")
    p.add_argument("--depth", type=int, default=4, help="blocks: depth + 1")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backend", default="auto", help="scan backend (model.scan_backend)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="total threads shared by the k ranks")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.ks[0] != 1:
        p.error("--ks must start with 1, the baseline")
    results: dict[int, list[dict]] = {k: [] for k in args.ks}
    for repeat in range(args.repeats):
        for k in args.ks:
            results[k].append(run(args, k))
            r = results[k][-1]
            print(f"repeat {repeat + 1}/{args.repeats} k={k}: {max(x['seconds'] for x in r['ranks']):.2f} s/step",
                  file=sys.stderr, flush=True)

    def median(k: int, key: str) -> float:  # over repeats, of the worst rank
        return statistics.median(max(rank[key] for rank in run["ranks"]) for run in results[k])

    tokens = results[1][0]["tokens"]
    base = {key: median(1, key) for key in ("saved", "peak", "seconds")}
    lines = [
        f"DiS-S-shaped blocks (width {args.width}, depth {args.depth}), {tokens} tokens, batch {args.batch}, fp32, "
        f"scan backend {args.backend}, {args.cores} cores in all; medians of {args.repeats} runs, worst rank",
        "",
        f"{'k':>2} {'ranks x threads':>15} {'tokens/rank':>11} {'saved act MB':>12} {'x k1':>6} {'target':>7} "
        f"{'peak act MB':>11} {'x k1':>6} {'s/step':>7} {'x k1':>6}",
        "-" * 92,
    ]
    for k in args.ks:
        r = results[k][0]
        saved, peak, secs = (median(k, key) for key in ("saved", "peak", "seconds"))
        layout = f"{k} x {r['threads']}"
        lines.append(
            f"{k:>2} {layout:>15} {r['longest']:>11} {saved / 1e6:>12.1f} {saved / base['saved']:>6.3f} "
            f"{1.2 / k:>7.3f} {peak / 1e6:>11.1f} {peak / base['peak']:>6.3f} {secs:>7.2f} "
            f"{secs / base['seconds']:>6.2f}"
        )
    blocks = args.depth + 1
    per_unit = {k: median(k, "saved") / (results[k][0]["longest"] * args.width * blocks * args.batch) for k in args.ks}
    per_unit_text = ", ".join(f"k={k} {v:.1f}" for k, v in per_unit.items())
    lines += ["", f"saved bytes per (token x width x block): {per_unit_text}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
