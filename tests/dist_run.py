"""Runs training scenarios inside ``torchrun`` for tests/test_distributed.py.

    torchrun --nproc_per_node=2 tests/dist_run.py SPEC.json

SPEC is a list of scenarios ``{"overrides": [...], "stop_at": int | null, "out": path}``.
Each trains with ``Trainer`` (stopping at ``stop_at`` and resuming in a fresh Trainer when
given) and rank 0 writes to ``out``: the whole raw and EMA weights, the final loss and every
rank's stored elements (``Strategy.local_numel``).
"""

from __future__ import annotations

import json
import logging
import sys

import torch
import torch.distributed as dist

from dis_dist.config import load_config
from dis_dist.train.trainer import Trainer


def run(scenario: dict) -> None:
    cfg = load_config(None, scenario["overrides"])
    if scenario.get("stop_at"):
        Trainer(cfg).fit(resume=scenario.get("resume", "auto"), stop_at_step=scenario["stop_at"])
    trainer = Trainer(cfg)
    result = trainer.fit(resume=scenario.get("resume", "auto"))
    strategy = trainer.strategy
    raw, ema = strategy.full_state_dict(ema=False), strategy.full_state_dict(ema=True)
    numel = [None] * trainer.env.world_size
    dist.all_gather_object(numel, strategy.local_numel())
    if trainer.env.is_main:
        torch.save({"model": raw, "ema": ema, "loss": result.final_loss, "numel": numel,
                    "step": result.step, "metrics": result.metrics}, scenario["out"])


def main(spec_path: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with open(spec_path) as f:
        scenarios = json.load(f)
    for scenario in scenarios:
        run(scenario)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
