"""The Strategy interface: it wraps (model, optimizer) and owns what depends on how the model
is distributed: placement, backward, the optimiser step (clipping included), the EMA, state
dicts and checkpoint I/O. The trainer calls only this interface.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dis_dist.config import RunConfig
from dis_dist.dist.env import DistEnv
from dis_dist.train.ema import ema_update

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool  # the gradient was not finite; the optimiser step was not taken


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, A_log/D, embeddings' positions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False) or name.endswith("pos_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Strategy(ABC):
    """One way of running (model, optimizer) over the ranks of a job."""

    name: str
    model: nn.Module  # call for the forward pass
    optimizer: torch.optim.Optimizer

    def __init__(self, env: DistEnv, cfg: RunConfig) -> None:
        self.env, self.cfg = env, cfg

    @abstractmethod
    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of ``loss`` (already divided by the accumulation steps)."""

    @abstractmethod
    def step(self) -> StepResult:
        """Clip, take the optimiser step unless the gradient is not finite, zero the gradients."""

    @abstractmethod
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights."""

    @abstractmethod
    def ema_model(self) -> nn.Module:
        """A module holding the EMA weights, callable like ``model`` (eval mode)."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write model, EMA and optimiser state into ``directory`` (called on every rank)."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote."""


class SingleDeviceStrategy(Strategy):
    """The whole model on one device (CPU or one GPU)."""

    name = "single"

    def __init__(
        self, env: DistEnv, cfg: RunConfig, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> None:
        super().__init__(env, cfg)
        self.model = model.to(env.device)
        self._ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = make_optimizer(param_groups(self.model, cfg.optim.weight_decay))

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> StepResult:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        norm_value = float(norm)
        skipped = not math.isfinite(norm_value)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm_value, skipped)

    def update_ema(self, decay: float) -> None:
        ema_update(self._ema, self.model, decay)

    def ema_model(self) -> nn.Module:
        return self._ema

    def save(self, directory: Path) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "ema": self._ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
            },
            directory / "model.pt",
        )

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "model.pt", map_location=self.env.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self._ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_strategy(
    env: DistEnv, cfg: RunConfig, model: nn.Module, make_optimizer: OptimizerFactory
) -> Strategy:
    """The strategy named by ``dist.strategy``."""
    if cfg.dist.strategy == "single":
        return SingleDeviceStrategy(env, cfg, model, make_optimizer)
    raise AssertionError(f"unhandled dist.strategy {cfg.dist.strategy!r}")  # config lists choices
