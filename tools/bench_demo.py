#!/usr/bin/env python3
"""Time the demo's training step (configs/demo_fmnist.yaml: DiS-T/4, 1 channel, 10 classes,
micro-batch 64, fp32, the native scan) in the settings it has had, in one process, and print
images/s with ratios to the first: the 32x32 demo with foreach AdamW (before #28), then 28x28
with foreach AdamW, then 28x28 with fused AdamW, with the mixer on the generic path (each
direction's conv, SiLU and projections apart, then stacked for the scan) and on the native CPU
path the demo takes (both convs and their SiLU in one kernel writing the scan's layout, the
projections batched over the directions). The first three run the generic path.

    python tools/bench_demo.py --rounds 5 --steps 20

The settings take turns, ``--steps`` steps each per round, so that a machine whose speed drifts
(a shared VM) slows all of them alike; each setting's time is the median of its rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dis_dist.config import load_config  # noqa: E402
from dis_dist.diffusion import create_diffusion  # noqa: E402
from dis_dist.distributed.env import DistEnv, init_distributed  # noqa: E402
from dis_dist.distributed.registry import build_strategy  # noqa: E402
from dis_dist.models.mamba import BiMamba  # noqa: E402
from dis_dist.models.spec import ModelSpec  # noqa: E402
from dis_dist.utils.cli import cli_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (name, image size, fused AdamW, the mixer's native CPU path)
SETTINGS = (("32x32, foreach AdamW (before)", 32, False, False), ("28x28, foreach AdamW", 28, False, False),
            ("28x28, fused AdamW", 28, True, False), ("28x28, fused AdamW, native mixer (demo)", 28, True, True))


def demo_step(size: int, fused: bool, env: DistEnv, native: bool = True) -> tuple[Callable[[], None], int]:
    """One optimiser step of the demo's model and recipe on fixed random images, as a closure."""
    cfg = load_config(ROOT / "configs" / "demo_fmnist.yaml", [f"data.image_size={size}", "dist.strategy=single"])
    torch.manual_seed(0)
    model = ModelSpec(cfg.model.name, input_size=size, in_channels=1, num_classes=10).build(scan_backend="auto")
    for mixer in model.modules():
        if isinstance(mixer, BiMamba):
            mixer.native_cpu = native
    o = cfg.optim
    strategy = build_strategy(
        env, cfg, model, 1,
        lambda groups: torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
    )
    diffusion = create_diffusion(learn_sigma=True, min_snr_gamma=cfg.diffusion.min_snr_gamma)
    batch = cfg.train.micro_batch
    x = torch.randn(batch, 1, size, size)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        t = torch.randint(0, 1000, (batch,))
        with strategy.micro_batch(last=True):
            loss = diffusion.training_losses(strategy.model, x, t, {"y": y})["loss"].mean()
            strategy.backward(loss)
        strategy.step()
        strategy.update_ema(cfg.train.ema_decay)

    return step, batch


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench_demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="turns each setting takes")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per setting first")
    args = p.parse_args(argv)
    env = init_distributed("single", "cpu")
    steps = []
    for _, size, fused, native in SETTINGS:
        step, batch = demo_step(size, fused, env, native)
        for _ in range(args.warmup):
            step()
        steps.append(step)
    times: list[list[float]] = [[] for _ in SETTINGS]
    for _ in range(args.rounds):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[i].append((time.perf_counter() - start) / args.steps)
    print(f"the demo's step (micro-batch {batch}, {torch.get_num_threads()} threads), median of "
          f"{args.rounds} rounds of {args.steps} steps")
    print(f"{'setting':40s} {'ms/step':>8s} {'img/s':>7s} {'ratio':>6s}   rounds (ms)")
    base = statistics.median(times[0])
    for (name, *_), ts in zip(SETTINGS, times):
        med = statistics.median(ts)
        print(f"{name:40s} {med * 1e3:8.1f} {batch / med:7.1f} {base / med:5.2f}x   "
              f"{' '.join(f'{t * 1e3:.0f}' for t in ts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
