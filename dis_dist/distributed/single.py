"""The whole model on one device (CPU or one GPU), in one process."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from dis_dist.config import RunConfig
from dis_dist.distributed.env import DistEnv
from dis_dist.distributed.init import materialize
from dis_dist.distributed.strategy import (
    OptimizerFactory,
    SchedulerFactory,
    StepResult,
    Strategy,
    lerp_ema,
    optimizer_numel,
    param_groups,
)
from dis_dist.errors import CheckpointError
from dis_dist.utils.safe_load import load_torch

CHECKPOINT_FILE = "model.pt"  # {"model", "ema", "optimizer"}: state dicts


class SingleDeviceStrategy(Strategy):
    """Weights, EMA and optimiser whole on this rank; checkpoints are one ``model.pt``.

    The ``ddp`` strategy extends it: with gradients averaged over ranks, every rank holds the
    same state, and rank 0 alone writes it.
    """

    name = "single"

    def __init__(
        self, env: DistEnv, cfg: RunConfig, model: nn.Module, accum: int,
        make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory,
    ) -> None:
        super().__init__(env, cfg, accum, model)
        self.module = materialize(model, env.device, cfg.train.seed).to(env.device)
        self.model = self.module
        self._ema = copy.deepcopy(self.module).eval().requires_grad_(False)
        self.optimizer = make_optimizer(param_groups(self.module, cfg.optim.weight_decay, self._no_decay))
        self.scheduler = make_scheduler(self.optimizer)

    def step(self) -> StepResult:
        return self._clip_and_step(p for p in self.module.parameters() if p.grad is not None)

    def update_ema(self, decay: float) -> None:
        lerp_ema(list(self._ema.parameters()), [p.detach() for p in self.module.parameters()], decay)

    def full_state_dict(self, ema: bool = True) -> dict[str, Tensor] | None:
        if not self.env.is_main:
            return None
        source = self._ema if ema else self.module
        return {k: v.detach().float().cpu() for k, v in source.state_dict().items()}

    def ema_model(self, all_ranks: bool = False) -> nn.Module | None:
        # Every rank holds the same EMA (the same initial weights, the same averaged gradients).
        return self._ema if self.env.is_main or all_ranks else None

    def save(self, directory: Path) -> None:
        if self.env.is_main:
            torch.save(
                {
                    "model": self.module.state_dict(),
                    "ema": self._ema.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                },
                directory / CHECKPOINT_FILE,
            )

    def load(self, directory: Path) -> None:
        file = directory / CHECKPOINT_FILE
        state = load_torch(file, map_location=self.env.device)
        try:
            self.module.load_state_dict(state["model"])
            self._ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file} does not fit this model: {type(e).__name__}: {e}") from None

    @classmethod
    def holds_checkpoint(cls, directory: Path) -> bool:
        return (directory / CHECKPOINT_FILE).is_file()

    @classmethod
    def read_weights(cls, directory: Path, model: nn.Module, ema: bool = True) -> tuple[dict[str, Tensor], Path]:
        source, key = directory / CHECKPOINT_FILE, "ema" if ema else "model"
        saved = load_torch(source, map_location="cpu")
        state = saved.get(key) if isinstance(saved, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{source} holds no {key!r} state dict: a damaged checkpoint")
        return state, source

    def local_numel(self) -> dict[str, int]:
        return {
            "params": sum(p.numel() for p in self.module.parameters()),
            "optimizer": optimizer_numel(self.optimizer),
            "ema": sum(p.numel() for p in self._ema.parameters()),
        }
