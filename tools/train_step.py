"""The training step that tools/bench_train.py times and tools/profile_step.py profiles, built
one way for both: their shared flags, the run config and process group, and a DiS under a
strategy taking diffusion-loss steps on random latents. Not a command.

A step is ``forward+backward``, ``optimizer`` and ``ema``, each inside a ``record_function``
range of that name, so a profile attributes the time of each phase exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from dis_dist.config import RunConfig, load_config
from dis_dist.diffusion import create_diffusion
from dis_dist.distributed.env import DistEnv, init_distributed
from dis_dist.distributed.registry import build_strategy
from dis_dist.distributed.strategy import Strategy
from dis_dist.models.spec import ModelSpec
from dis_dist.train.optim import adamw

STEP_RANGES = ("forward+backward", "optimizer", "ema")  # the record_function ranges of a step
EMA_DECAY = 0.9999


def add_step_args(p: argparse.ArgumentParser, *, steps: int = 10, warmup: int = 3) -> None:
    """The flags that say which step to build and how many times to take it."""
    p.add_argument("--model", default="DiS-B/2", help="a registry name, DiS-{T,S,B,M,L,H}/{2,4,8}")
    p.add_argument("--latent", type=int, default=32, help="latent size (256 px -> 32)")
    p.add_argument("--strategy", default="fsdp", choices=("single", "ddp", "fsdp", "deepspeed"))
    p.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed ZeRO stage (--strategy deepspeed)")
    p.add_argument("--micro-batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--ckpt", type=int, default=0, help="train.activation_checkpointing")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="bf16: autocast")
    p.add_argument("--steps", type=int, default=steps, help="measured steps")
    p.add_argument("--warmup", type=int, default=warmup, help="steps taken before measuring")


def setup(args: argparse.Namespace) -> tuple[RunConfig, DistEnv, ModelSpec]:
    """The run config, this process's place in the job (a process group even of one for the
    strategies that need one; :func:`~dis_dist.utils.cli.cli_main` closes it) and the model spec
    for ``build_model``."""
    cfg = load_config(None, [
        f"model.name={args.model}", f"data.image_size={args.latent}", f"dist.strategy={args.strategy}",
        f"dist.zero_stage={args.zero_stage}", f"train.precision={args.precision}",
        f"train.activation_checkpointing={args.ckpt}", f"train.micro_batch={args.micro_batch}",
        f"train.global_batch={args.micro_batch}",
    ])
    env = init_distributed(args.strategy, "auto")
    cfg.train.global_batch = args.micro_batch * env.world_size
    spec = ModelSpec(args.model, input_size=args.latent, in_channels=4, num_classes=1000)
    return cfg, env, spec


def describe(args: argparse.Namespace, env: DistEnv, spec: ModelSpec) -> str:
    """One line naming the step: model, size, strategy, precision, batch, ranks and device."""
    params = spec.num_parameters()  # on the meta device: no second model in memory
    device = env.device
    return (f"{args.model} latent {args.latent} ({params / 1e6:.0f}M params), {args.strategy}"
            f"{' ZeRO-' + str(args.zero_stage) if args.strategy == 'deepspeed' else ''}, {args.precision}, "
            f"micro-batch {args.micro_batch} x {env.world_size} rank(s), activation checkpointing {args.ckpt}, "
            f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")


@dataclass
class TrainStep:
    step: Callable[[], None]  # one optimiser step on one micro-batch, then the EMA update
    sync: Callable[[], None]  # wait for the device to finish what was queued
    strategy: Strategy


def build_train_step(args: argparse.Namespace, cfg: RunConfig, env: DistEnv, spec: ModelSpec,
                     backend: str) -> TrainStep:
    """A fresh model (seed 0) with the scan ``backend`` under the strategy of ``cfg``, the trainer's
    AdamW at a constant rate, and a step on fixed random latents with fresh diffusion times."""
    torch.manual_seed(0)
    model = spec.build(scan_backend=backend)
    model.set_activation_checkpointing(args.ckpt)
    strategy = build_strategy(
        env, cfg, model, 1,
        lambda groups: adamw(groups, cfg.optim, env.device),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
    )
    diffusion = create_diffusion(learn_sigma=True)
    device = env.device
    x = torch.randn(args.micro_batch, 4, args.latent, args.latent, device=device)
    y = torch.randint(0, 1000, (args.micro_batch,), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    fwd_bwd, optimizer, ema = STEP_RANGES

    def step() -> None:
        t = torch.randint(0, 1000, (args.micro_batch,), device=device)
        with record_function(fwd_bwd):
            with strategy.micro_batch(last=True):
                with autocast:
                    loss = diffusion.training_losses(strategy.model, x, t, {"y": y})["loss"].mean()
                strategy.backward(loss)
        with record_function(optimizer):
            strategy.step()
        with record_function(ema):
            strategy.update_ema(EMA_DECAY)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return TrainStep(step, sync, strategy)
