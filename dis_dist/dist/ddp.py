"""DistributedDataParallel: every rank holds the whole model; gradients are averaged in buckets
that overlap the backward pass, and only on the last micro-batch of an accumulated step."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dis_dist.config import RunConfig
from dis_dist.dist.env import DistEnv
from dis_dist.dist.single import SingleDeviceStrategy
from dis_dist.dist.strategy import OptimizerFactory, SchedulerFactory


class DDPStrategy(SingleDeviceStrategy):
    name = "ddp"

    def __init__(
        self, env: DistEnv, cfg: RunConfig, model: nn.Module, accum: int,
        make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory,
    ) -> None:
        super().__init__(env, cfg, model, accum, make_optimizer, make_scheduler)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        self.model = DistributedDataParallel(self.module, device_ids=device_ids)

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return nullcontext() if last else self.model.no_sync()
