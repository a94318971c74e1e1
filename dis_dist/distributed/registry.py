"""The strategies by name: ``build_strategy`` makes the one ``dist.strategy`` names. It lives apart
from the interface (strategy.py), which every strategy imports, so that no import loops back."""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from dis_dist.config import RunConfig
from dis_dist.distributed.env import DistEnv
from dis_dist.distributed.strategy import OptimizerFactory, SchedulerFactory, Strategy
from dis_dist.errors import CheckpointError, ConfigError

# Imported on first use: DeepSpeed's module imports DeepSpeed.
STRATEGIES = {
    "single": "dis_dist.distributed.single:SingleDeviceStrategy",
    "ddp": "dis_dist.distributed.ddp:DDPStrategy",
    "fsdp": "dis_dist.distributed.fsdp:FSDPStrategy",
    "deepspeed": "dis_dist.distributed.zero:DeepSpeedStrategy",
}


def strategy_class(name: str) -> type[Strategy]:
    """Return the strategy called ``name`` (``dist.strategy``, or the ``strategy`` a checkpoint's
    model.json records): it owns that checkpoint layout too."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def checkpoint_strategy(directory: Path) -> type[Strategy]:
    """Return the strategy whose layout the checkpoint in ``directory`` has (``ddp`` writes
    ``single``'s); CheckpointError when none has it."""
    for name in STRATEGIES:
        cls = strategy_class(name)
        if cls.holds_checkpoint(directory):
            return cls
    raise CheckpointError(f"{str(directory)!r} is in no strategy's checkpoint layout: not a dis_dist checkpoint")


def build_strategy(
    env: DistEnv, cfg: RunConfig, model: nn.Module, accum: int,
    make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory,
) -> Strategy:
    """Build the strategy ``dist.strategy`` names around ``model`` and its optimiser."""
    return strategy_class(cfg.dist.strategy)(env, cfg, model, accum, make_optimizer, make_scheduler)
