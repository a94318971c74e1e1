"""``python -m dis_dist.train --config configs/X.yaml [section.key=value ...] [--resume auto]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dis_dist.config import load_config
from dis_dist.utils.cli import cli_main, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dis_dist.train",
        description="Train a DiS diffusion model. Settings come from a YAML config, then "
        "section.key=value overrides (every key: docs/configuration.md).",
    )
    p.add_argument("--config", help="YAML run config (default: built-in defaults)")
    p.add_argument(
        "--resume", default="auto",
        help="'auto' (newest complete checkpoint in the run dir, else start fresh), 'none', "
        "or a checkpoint directory (default: auto)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=1000 model.name=DiS-S/2")
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    from dis_dist.train.trainer import Trainer  # after config errors, which need no torch work

    trainer = Trainer(cfg)
    result = trainer.fit(resume=args.resume)
    if not trainer.env.is_main:
        return 0
    print(
        f"trained {result.step} steps, final loss {result.final_loss:.4f}, in {result.wall_time_s / 60:.1f} min\n"
        f"run directory: {cfg.run_dir}  (watch: tensorboard --logdir {Path(cfg.run_dir).parent})"
    )
    if result.samples_png is not None:
        print(f"samples: {result.samples_png}")
    if result.metrics:
        from dis_dist.eval.fid import METRIC_NAMES

        print(f"evaluation of {cfg.eval.num_samples} EMA samples against {cfg.eval.reference}:")
        for key, value in result.metrics.items():
            print(f"  {METRIC_NAMES[key]}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
