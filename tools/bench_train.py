#!/usr/bin/env python3
"""Time training steps of a DiS under a strategy, on random latents, and print images/s, MFU,
peak memory and the planner's estimate for the same setting.

    python tools/bench_train.py --model DiS-B/2 --strategy fsdp --micro-batch 32 --ckpt 1
    python tools/bench_train.py --model DiS-S/2 --strategy single --precision fp32 --scan-backends chunked,cpu
    torchrun --nproc_per_node 8 tools/bench_train.py --model DiS-H/2 --strategy fsdp --ckpt 1

Runs with a process group even on one rank (a group of one), so ``fsdp`` and ``ddp`` work in a
lone process. Peak memory is ``torch.cuda.max_memory_allocated`` on GPUs (the planner adds its
fixed reserve and fragmentation slack to its estimate: both are shown); on CPUs it is the
process's peak RSS, which the planner does not model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dis_dist.config import RunConfig, load_config  # noqa: E402
from dis_dist.diffusion import create_diffusion  # noqa: E402
from dis_dist.distributed.env import DistEnv, init_distributed  # noqa: E402
from dis_dist.distributed.strategy import build_strategy  # noqa: E402
from dis_dist.models import build_model  # noqa: E402
from dis_dist.models.flops import count_parameters, model_flops  # noqa: E402
from dis_dist.plan import FRAGMENTATION, GB, RESERVE_GB, SETTINGS, estimate  # noqa: E402
from dis_dist.train.metrics import peak_flops, peak_memory_gb  # noqa: E402


def time_steps(args: argparse.Namespace, cfg: RunConfig, env: DistEnv, spec: dict, backend: str) -> tuple[float, float]:
    """(seconds per step, images/s) of ``args.steps`` timed steps with the scan ``backend``."""
    torch.manual_seed(0)
    model = build_model(**spec, scan_backend=backend)
    model.set_activation_checkpointing(args.ckpt)
    strategy = build_strategy(
        env, cfg, model, 1,
        lambda groups: torch.optim.AdamW(groups, lr=1e-4),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
    )
    diffusion = create_diffusion(learn_sigma=True)
    device = env.device
    x = torch.randn(args.micro_batch, 4, args.latent, args.latent, device=device)
    y = torch.randint(0, 1000, (args.micro_batch,), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        t = torch.randint(0, 1000, (args.micro_batch,), device=device)
        with strategy.micro_batch(last=True):
            with autocast:
                loss = diffusion.training_losses(strategy.model, x, t, {"y": y})["loss"].mean()
            strategy.backward(loss)
        strategy.step()
        strategy.update_ema(0.9999)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    return elapsed / args.steps, args.steps * args.micro_batch * env.world_size / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiS-B/2")
    p.add_argument("--latent", type=int, default=32, help="latent size (256 px -> 32)")
    p.add_argument("--strategy", default="fsdp", choices=("single", "ddp", "fsdp", "deepspeed"))
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--ckpt", type=int, default=0, help="train.activation_checkpointing")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--scan-backends", default="auto",
                   help="comma-separated scan backends, each timed in turn (e.g. chunked,cpu); ratios to the first")
    args = p.parse_args(argv)

    cfg = load_config(None, [
        f"model.name={args.model}", f"data.image_size={args.latent}", f"dist.strategy={args.strategy}",
        f"dist.zero_stage={args.zero_stage}", f"train.precision={args.precision}",
        f"train.activation_checkpointing={args.ckpt}", f"train.micro_batch={args.micro_batch}",
        f"train.global_batch={args.micro_batch}",
    ])
    env = init_distributed(args.strategy, "auto")
    cfg.train.global_batch = args.micro_batch * env.world_size
    spec = {"name": args.model, "input_size": args.latent, "in_channels": 4, "num_classes": 1000}
    device = env.device
    params = count_parameters(**spec)  # on the meta device: no second model in memory
    flops = 3 * model_flops(**spec).total
    peak = peak_flops(device, args.precision)
    setting = {"single": "ddp", "ddp": "ddp", "deepspeed": f"zero{args.zero_stage}"}.get(args.strategy, "fsdp")
    assert setting in {s.name for s in SETTINGS}
    est = {e.setting.name: e for e in estimate(args.model, latent=args.latent, gpus=env.world_size,
                                               precision=args.precision)}[setting]
    planned = est.total(args.micro_batch, bool(args.ckpt))
    planned_live = (planned - RESERVE_GB * GB) / FRAGMENTATION  # what max_memory_allocated sees
    if env.is_main:
        print(f"{args.model} latent {args.latent} ({params / 1e6:.0f}M params), {args.strategy}"
              f"{' ZeRO-' + str(args.zero_stage) if args.strategy == 'deepspeed' else ''}, {args.precision}, "
              f"micro-batch {args.micro_batch} x {env.world_size} rank(s), activation checkpointing {args.ckpt}, "
              f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    first = None
    for backend in [b for b in args.scan_backends.split(",") if b]:
        step_s, images_per_sec = time_steps(args, cfg, env, spec, backend)
        first = first or images_per_sec
        mem = peak_memory_gb(device)
        if not env.is_main:
            continue
        mfu = f"MFU {images_per_sec * flops / (peak * env.world_size):.1%}" if peak else "MFU n/a (no peak known)"
        print(f"  scan {backend:<9} step {step_s * 1e3:.1f} ms | {images_per_sec:.1f} img/s "
              f"({images_per_sec / first:.2f}x {args.scan_backends.split(',')[0]}) | "
              f"{images_per_sec / env.world_size:.1f} img/s/device | {mfu}")
        per_image = est.act_per_sample_ckpt + est.act_block if args.ckpt else est.act_per_sample
        print(f"  peak memory {mem:.2f} GB {'allocated' if device.type == 'cuda' else 'RSS'} | planner: "
              f"{planned_live / GB:.2f} GB live tensors, {planned / GB:.2f} GB with reserve and slack "
              f"(states {est.states / GB:.2f}, activations {args.micro_batch * per_image / GB:.2f})")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
