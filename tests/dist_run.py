"""Runs training scenarios inside ``torchrun`` for tests/test_distributed.py.

    torchrun --nproc_per_node=2 tests/dist_run.py SPEC.json

SPEC is a list of scenarios ``{"overrides": [...], "out": path}`` with optionally
``"signal_at": k`` (rank 0 sends itself SIGTERM during step k; the run saves and stops, then a
fresh Trainer resumes it), ``"plant_from": run_dir`` (that run's directory is copied, every
file of its newest checkpoint replaced by a pickle that would create ``run_dir/PAYLOAD``, and
the copy resumed) or ``"init_only": true`` (no training: the initial weights). Rank 0 writes to
``out``: the whole raw and EMA weights, the final loss, every rank's stored elements
(``Strategy.local_numel``) and whether a payload ran.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from dis_dist.train.trainer import Trainer

PAYLOAD = "payload-ran"


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return open, (self.marker, "w")


def plant(source: Path, run_dir: Path) -> None:
    shutil.copytree(source, run_dir)
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    payload = io.BytesIO()
    torch.save({"state": _Payload(str(run_dir / PAYLOAD))}, payload)
    for path in newest.rglob("*"):
        if path.is_file() and path.name not in ("COMPLETE", "model.json"):
            path.write_bytes(payload.getvalue())


def signal_during(trainer: Trainer, step: int) -> None:
    original = trainer.diffusion.training_losses

    def losses(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if trainer.step == step and trainer.env.is_main:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    trainer.diffusion.training_losses = losses


def run(scenario: dict) -> None:
    # Imported here, not at the top: the shard stream's loader workers are spawned, and each
    # re-imports this script (as __mp_main__); they need none of the trainer's imports.
    from dis_dist.config import load_config
    from dis_dist.train.trainer import Trainer

    cfg = load_config(None, scenario["overrides"])
    if scenario.get("signal_at"):
        stopped = Trainer(cfg)
        signal_during(stopped, scenario["signal_at"])
        assert stopped.fit().stopped, "the signal did not stop the run"
    trainer = Trainer(cfg)
    if scenario.get("init_only"):
        raw = trainer.strategy.full_state_dict(ema=False)
        if trainer.env.is_main:
            torch.save({"model": raw}, scenario["out"])
        return
    if scenario.get("plant_from"):
        if trainer.env.is_main:
            plant(Path(scenario["plant_from"]), Path(cfg.run_dir))
        trainer.env.barrier()
    result = trainer.fit()
    strategy = trainer.strategy
    raw, ema = strategy.full_state_dict(ema=False), strategy.full_state_dict(ema=True)
    numel = [None] * trainer.env.world_size
    dist.all_gather_object(numel, strategy.local_numel())
    if trainer.env.is_main:
        torch.save({"model": raw, "ema": ema, "loss": result.final_loss, "numel": numel,
                    "step": result.step, "metrics": result.metrics,
                    "payload_ran": (Path(cfg.run_dir) / PAYLOAD).exists()}, scenario["out"])


def main(spec_path: str) -> None:
    import functools

    import dis_dist.data

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Every scenario reading Fashion-MNIST reads the same split: decode its IDX files once per
    # launch, not once per Trainer (the loaders only index the dataset).
    dis_dist.data.load_fmnist = functools.lru_cache(maxsize=None)(dis_dist.data.load_fmnist)
    with open(spec_path) as f:
        scenarios = json.load(f)
    for scenario in scenarios:
        run(scenario)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
