"""DistributedDataParallel: every rank holds the whole model; gradients are averaged in buckets
that overlap the backward pass, and only on the last micro-batch of an accumulated step."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dis_dist.config import RunConfig
from dis_dist.distributed.env import DistEnv
from dis_dist.distributed.single import SingleDeviceStrategy
from dis_dist.distributed.strategy import OptimizerFactory, SchedulerFactory

# find_unused_parameters is set for its fixed bucket layout (below), not for unused parameters.
warnings.filterwarnings("ignore", message=r".*find_unused_parameters=True was specified")


class DDPStrategy(SingleDeviceStrategy):
    name = "ddp"

    def __init__(
        self, env: DistEnv, cfg: RunConfig, model: nn.Module, accum: int,
        make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory,
    ) -> None:
        super().__init__(env, cfg, model, accum, make_optimizer, make_scheduler)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # DDP regroups its gradient buckets after its first iteration, and on more than 2 ranks
        # the new layout changes the order in which the all-reduce sums: a run resumed at step k
        # would regroup at k, not at 0, and drift from the uninterrupted run in the last digits
        # (found by the 4-rank SLURM resume tests). With find_unused_parameters, DDP keeps its
        # first layout for good, at the cost of one walk over the autograd graph per step.
        self.model = DistributedDataParallel(self.module, device_ids=device_ids, find_unused_parameters=True)

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return nullcontext() if last else self.model.no_sync()
