#!/usr/bin/env python3
"""Time training steps of a DiS under a strategy, on random latents, and print images/s, MFU,
peak memory and the planner's estimate for the same setting.

    python tools/bench_train.py --model DiS-B/2 --strategy fsdp --micro-batch 32 --ckpt 1
    python tools/bench_train.py --model DiS-S/2 --strategy single --precision fp32 --scan-backends chunked,cpu
    torchrun --nproc_per_node 8 tools/bench_train.py --model DiS-H/2 --strategy fsdp --ckpt 1
    python tools/bench_train.py --model DiS-H/2 --micro-batches 16,32,64 --ckpts 1,0 --scan-backends triton_tiled

``--micro-batches`` and ``--ckpts`` sweep settings in one process (a setting that runs out of GPU
memory is reported as such and the sweep goes on).

Runs with a process group even on one rank (a group of one), so ``fsdp`` and ``ddp`` work in a
lone process. Peak memory is ``torch.cuda.max_memory_allocated`` on GPUs (the planner adds its
fixed reserve and fragmentation slack to its estimate: both are shown); on CPUs it is the
process's peak RSS, which the planner does not model.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dis_dist.config import RunConfig  # noqa: E402
from dis_dist.distributed.env import DistEnv  # noqa: E402
from dis_dist.models.spec import ModelSpec  # noqa: E402
from dis_dist.plan import FRAGMENTATION, GB, RESERVE_GB, SETTINGS, estimate  # noqa: E402
from dis_dist.train.metrics import peak_flops, peak_memory_gb  # noqa: E402
from dis_dist.utils.cli import cli_main  # noqa: E402
from tools.train_step import add_step_args, build_train_step, describe, setup  # noqa: E402


def time_steps(args: argparse.Namespace, cfg: RunConfig, env: DistEnv, spec: ModelSpec,
               backend: str) -> tuple[float, float]:
    """(seconds per step, images/s) of ``args.steps`` timed steps with the scan ``backend``."""
    train = build_train_step(args, cfg, env, spec, backend)
    for _ in range(args.warmup):
        train.step()
    train.sync()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train.step()
    train.sync()
    elapsed = time.perf_counter() - start
    return elapsed / args.steps, args.steps * args.micro_batch * env.world_size / elapsed


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    p.add_argument("--scan-backends", default="auto",
                   help="comma-separated scan backends, each timed in turn (e.g. chunked,cpu); ratios to the first")
    p.add_argument("--micro-batches", type=_ints, default=None, help="comma-separated: a sweep over --micro-batch")
    p.add_argument("--ckpts", type=_ints, default=None, help="comma-separated: a sweep over --ckpt")
    args = p.parse_args(argv)

    cfg, env, spec = setup(args)
    device = env.device
    flops = 3 * spec.flops().total
    peak = peak_flops(device, args.precision)
    setting = {"single": "ddp", "ddp": "ddp", "deepspeed": f"zero{args.zero_stage}"}.get(args.strategy, "fsdp")
    assert setting in {s.name for s in SETTINGS}
    est = {e.setting.name: e for e in estimate(args.model, latent=args.latent, gpus=env.world_size,
                                               precision=args.precision)}[setting]
    backends = [b for b in args.scan_backends.split(",") if b]
    sweep = [(mb, ck) for ck in (args.ckpts or [args.ckpt]) for mb in (args.micro_batches or [args.micro_batch])]
    for args.micro_batch, args.ckpt in sweep:
        cfg.train.micro_batch, cfg.train.activation_checkpointing = args.micro_batch, args.ckpt
        cfg.train.global_batch = args.micro_batch * env.world_size
        planned = est.total(args.micro_batch, bool(args.ckpt))
        planned_live = (planned - RESERVE_GB * GB) / FRAGMENTATION  # what max_memory_allocated sees
        if env.is_main:
            print(describe(args, env, spec), flush=True)
        first = None
        for backend in backends:
            try:
                step_s, images_per_sec = time_steps(args, cfg, env, spec, backend)
            except torch.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                if env.is_main:
                    print(f"  scan {backend:<12} out of GPU memory (planner: {planned / GB:.2f} GB)", flush=True)
                continue
            first = first or images_per_sec
            mem = peak_memory_gb(device)
            if not env.is_main:
                continue
            mfu = f"MFU {images_per_sec * flops / (peak * env.world_size):.1%}" if peak else "MFU n/a (no peak known)"
            print(f"  scan {backend:<12} step {step_s * 1e3:.1f} ms | {images_per_sec:.1f} img/s "
                  f"({images_per_sec / first:.2f}x {backends[0]}) | "
                  f"{images_per_sec / env.world_size:.1f} img/s/device | {mfu}")
            per_image = est.act_per_sample_ckpt + est.act_block if args.ckpt else est.act_per_sample
            print(f"  peak memory {mem:.2f} GB {'allocated' if device.type == 'cuda' else 'RSS'} | planner: "
                  f"{planned_live / GB:.2f} GB live tensors, {planned / GB:.2f} GB with reserve and slack "
                  f"(states {est.states / GB:.2f}, activations {args.micro_batch * per_image / GB:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
