#!/usr/bin/env python3
"""DiS-H/2 end to end on the CPU ranks of one machine: per strategy, train a few steps, save,
resume and train one more, export to safetensors and draw a guided sample grid, and print
per-rank peak resident memory against the planner's figure for the same setting, seconds per
step, and checkpoint write/read times and sizes.

    python tools/bench_scale.py                                  # DiS-H/2, fsdp and zero3, 2 ranks
    python tools/bench_scale.py --model DiS-B/2 --strategies fsdp

Data: random 32x32x4 latents of 1000 classes (the subject is memory and time, not the data), read
with ``data.num_workers`` workers. Each phase's peak is the rank's VmHWM, reset at the phase's
start (``/proc/self/clear_refs``); "train" covers building the model and the steps, so it is the
figure the planner (``python -m dis_dist.plan --cpu``) estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {"fsdp": ["dist.strategy=fsdp"], "zero3": ["dist.strategy=deepspeed", "dist.zero_stage=3"]}
# ZeRO-3's buckets, optimiser sub-groups and live parameters, smaller than
# configs/deepspeed/zero3.json's GPU-sized ones (2e8 elements to reduce, twice over, are 1.6 GB
# per rank in fp32; one sub-group of a rank's whole partition makes AdamW's temporaries
# 2 x 1.8 GB): two DiS-H/2 ranks must fit 24 GB.
ZERO3_BUCKET = 2e7
ZERO3_CONFIG = {"zero_optimization": {"reduce_bucket_size": ZERO3_BUCKET, "stage3_prefetch_bucket_size": ZERO3_BUCKET,
                                      "sub_group_size": ZERO3_BUCKET, "stage3_max_live_parameters": ZERO3_BUCKET,
                                      "stage3_max_reuse_distance": 0,
                                      "stage3_param_persistence_threshold": 100000,
                                      "contiguous_gradients": True}}
RESULT = "BENCH_SCALE "  # the line a worker prints its measurements on


def peak_rss_gb() -> float:
    """This process's peak resident memory since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def file_rss_gb() -> float:
    """This process's resident pages backed by files (memory-mapped checkpoints, libraries):
    counted in VmHWM, yet page cache the kernel can reclaim."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no RssFile in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Phases:
    """Wall time and peak RSS of named phases of a worker."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.file: dict[str, float] = {}  # file-backed resident GB at the phase's end
        self._open: tuple[str, float] | None = None

    def start(self, name: str, reset: bool = True) -> None:
        self.stop()
        if reset:
            reset_peak()
        self._open = (name, time.perf_counter())

    def stop(self) -> None:
        if self._open:
            name, t0 = self._open
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.peak[name] = max(self.peak.get(name, 0.0), peak_rss_gb())
            self.file[name] = max(self.file.get(name, 0.0), file_rss_gb())
            self._open = None

    def around(self, obj: object, method: str, name: str) -> None:
        """Time every call of ``obj.method`` as phase ``name`` (resuming the open phase after)."""
        original = getattr(obj, method)

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            outer = self._open[0] if self._open else None
            self.start(name)
            try:
                return original(*args, **kwargs)
            finally:
                self.stop()
                if outer:
                    self.start(outer)

        setattr(obj, method, timed)


def worker(args: argparse.Namespace) -> None:
    """One rank of one run (under torchrun): ``train`` (steps, then save as a stopped run
    would) or ``resume`` (load, one step, save, the end-of-run grid)."""
    import torch.distributed as dist

    from dis_dist.config import load_config
    from dis_dist.train.trainer import Trainer

    phases = Phases()
    phases.start("train")
    start = time.perf_counter()
    trainer = Trainer(load_config(None, args.overrides))
    init_s = time.perf_counter()
    phases.seconds["init"] = init_s - start
    step_times: list[float] = []
    step = trainer.strategy.step

    def timed_step():  # noqa: ANN202
        result = step()
        step_times.append(time.perf_counter())
        return result

    trainer.strategy.step = timed_step
    phases.around(trainer, "save_checkpoint", "save")
    phases.around(trainer, "load_checkpoint", "load")
    phases.around(trainer, "sample_grid", "grid")
    result = trainer.fit(resume="auto", stop_at_step=args.stop_at)
    phases.stop()
    steps = [b - a for a, b in zip([init_s, *step_times], step_times)]
    mine = {"rank": trainer.env.rank, "seconds": phases.seconds, "peak_gb": phases.peak, "file_gb": phases.file,
            "step_s": steps, "step": result.step}
    everyone = [None] * trainer.env.world_size
    dist.all_gather_object(everyone, mine)
    if trainer.env.is_main:
        print(RESULT + json.dumps(everyone), flush=True)
    dist.destroy_process_group()


def export_worker(args: argparse.Namespace) -> None:
    from dis_dist.train.checkpoint import CheckpointManager
    from dis_dist.train.export import export_checkpoint

    reset_peak()
    start = time.perf_counter()
    ckpt = CheckpointManager(Path(args.run_dir) / "checkpoints", 3).latest()
    weights = export_checkpoint(ckpt, Path(args.run_dir) / "export")
    print(RESULT + json.dumps({"seconds": time.perf_counter() - start, "peak_gb": peak_rss_gb(),
                               "bytes": weights.stat().st_size}), flush=True)


def _run(cmd: list[str], env: dict[str, str], log: Path) -> dict | list:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}; see {log}")
    return json.loads(lines[-1][len(RESULT):])


def _dir_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def bench(args: argparse.Namespace) -> list[dict]:
    from dis_dist.plan import estimate
    from tests.fixtures import write_random_cache  # a test fixture: the repository root is on sys.path

    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        write_random_cache(data, shards=8, per_shard=16, channels=4, size=args.latent, classes=1000)
    ds_config = out / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3_CONFIG))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    rows = []
    for name in args.strategies:
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        log = out / f"{name}.log"
        log.unlink(missing_ok=True)
        overrides = [
            f"run_dir={run_dir}", "data.source=shards", f"data.url={data}", f"data.num_workers={args.workers}",
            f"model.name={args.model}", f"train.steps={args.steps + 1}", f"train.global_batch={args.nproc}",
            "train.micro_batch=1", "train.activation_checkpointing=1", "train.precision=fp32", "log.every=1",
            "checkpoint.every=0", "sample.every=0", f"sample.num={args.grid}", f"sample.steps={args.sample_steps}",
            "sample.cfg_scale=4.0", f"sample.batch_size={args.grid_batch}", *STRATEGIES[name],
            *([f"dist.deepspeed_config={ds_config}"] if name == "zero3" else []),
        ]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                    str(Path(__file__).resolve()), "--worker"]
        print(f"{name}: training {args.steps} steps ...", flush=True)
        train = _run([*torchrun, "--stop-at", str(args.steps), *overrides], env, log)
        ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
        ckpt_gb = _dir_gb(ckpt)
        print(f"{name}: resuming for 1 step and the grid ...", flush=True)
        resume = _run([*torchrun, *overrides], env, log)
        print(f"{name}: exporting ...", flush=True)
        export = _run([sys.executable, str(Path(__file__).resolve()), "--export-worker", "--run-dir", str(run_dir)],
                      env, log)
        plan = {e.setting.name: e for e in estimate(args.model, latent=args.latent, gpus=args.nproc,
                                                    gpus_per_node=args.nproc, precision="fp32",
                                                    zero_buckets={3: 3 * ZERO3_BUCKET},
                                                    zero3_sub_group=ZERO3_BUCKET, zero3_live=ZERO3_BUCKET)}[name]
        rows.append({"strategy": name, "train": train, "resume": resume, "export": export, "ckpt_gb": ckpt_gb,
                     "planned_gb": plan.total(1, True, host=True) / 1e9})
        if not args.keep:  # DiS-H/2 leaves 31 GB a strategy: two checkpoints and the export
            for written in ("checkpoints", "export"):
                shutil.rmtree(run_dir / written)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> str:
    import statistics

    lines = [
        f"{args.model} ({args.latent}x{args.latent}x4, 1000 classes) on {args.nproc} CPU ranks x {args.threads} "
        f"thread(s), micro-batch 1, activation checkpointing, fp32, data.num_workers={args.workers}",
        "",
        f"{'strategy':<8} {'init s':>7} {'s/step':>7} {'train peak GB':>14} {'planner GB':>11} {'ratio':>6} "
        f"{'ckpt GB':>8} {'write s':>8} {'read s':>7} {'resume peak GB':>15} {'export s':>9} {'export GB':>10} "
        f"{'grid s':>7} {'grid peak GB':>13}",
        "-" * 141,
    ]
    for r in rows:
        train, resume = r["train"], r["resume"]
        peak = [rank["peak_gb"]["train"] for rank in train]
        steps = [s for rank in train[:1] for s in rank["step_s"][1:]] or train[0]["step_s"]
        write = statistics.median([rank["seconds"]["save"] for rank in train + resume])
        read = max(rank["seconds"]["load"] for rank in resume)
        resume_peak = max(max(rank["peak_gb"].get(k, 0.0) for k in ("load", "train", "save")) for rank in resume)
        grid_s = max(rank["seconds"].get("grid", 0.0) for rank in resume)
        grid_peak = max(rank["peak_gb"].get("grid", 0.0) for rank in resume)
        lines.append(
            f"{r['strategy']:<8} {train[0]['seconds'].get('init', 0):>7.0f} {statistics.median(steps):>7.1f} "
            f"{'/'.join(f'{p:.2f}' for p in peak):>14} {r['planned_gb']:>11.2f} {max(peak) / r['planned_gb']:>6.2f} "
            f"{r['ckpt_gb']:>8.2f} {write:>8.1f} {read:>7.1f} {resume_peak:>15.2f} {r['export']['seconds']:>9.1f} "
            f"{r['export']['peak_gb']:>10.2f} {grid_s:>7.0f} {grid_peak:>13.2f}"
        )
    lines.append(f"(peaks per rank, VmHWM; grid: {args.grid} images, guidance 4.0, {args.sample_steps} sampler "
                 f"step(s), {args.grid_batch} per forward pass; export: the EMA to safetensors in its own process)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiS-H/2")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--steps", type=int, default=3, help="steps before the checkpoint (one more after resuming)")
    p.add_argument("--workers", type=int, default=2, help="data.num_workers")
    p.add_argument("--grid", type=int, default=16, help="images in the end-of-run grid")
    p.add_argument("--grid-batch", type=int, default=4, help="sample.batch_size for the grid")
    p.add_argument("--sample-steps", default="2", help="sampler steps of the grid")
    p.add_argument("--out", default="runs/bench_scale")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and exports (else deleted once measured)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--export-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    args.overrides = rest
    if args.worker:
        worker(args)
        return 0
    if args.export_worker:
        export_worker(args)
        return 0
    rows = bench(args)
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
