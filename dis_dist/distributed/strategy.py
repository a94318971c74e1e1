"""The Strategy interface: it wraps (model, optimizer, schedule) and owns what depends on how
the model is distributed: placement, gradient accumulation and synchronisation, the optimiser
step (clipping included), the EMA, full state dicts and checkpoint I/O. The trainer calls only
this interface; ``dis_dist.distributed.registry.build_strategy`` picks the implementation that
``dist.strategy`` names.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dis_dist.config import RunConfig
from dis_dist.distributed.env import DistEnv

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool  # the gradient was not finite; the optimiser step was not taken


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters without weight decay: biases, norms, A_log/D, the positional embedding.
    Read before a strategy wraps the model: sharding replaces the parameter objects (and the
    ``_no_weight_decay`` marks on them), not their names."""
    return {
        name for name, p in model.named_parameters()
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False) or name.endswith("pos_embed")
    }


def param_groups(model: nn.Module, weight_decay: float, no_decay: set[str]) -> list[dict]:
    """Two AdamW groups: with ``weight_decay``, and without it for the names in ``no_decay``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n not in no_decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
    ]


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure on the meta device: no memory for its weights."""
    memo: dict[int, object] = {id(b): torch.empty_like(b, device="meta") for b in model.buffers()}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


class Strategy(ABC):
    """One way of running (model, optimizer) over the ranks of a job.

    Per optimiser step the trainer runs ``accum`` micro-batches, each as
    ``with micro_batch(last): loss = loss_fn(model); backward(loss)``, then ``step()`` and
    ``update_ema()``. Methods marked collective must be called on every rank.
    """

    name: str
    model: nn.Module  # call for the forward pass
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def __init__(self, env: DistEnv, cfg: RunConfig, accum: int, model: nn.Module) -> None:
        self.env, self.cfg, self.accum = env, cfg, accum
        self._no_decay = no_decay_names(model)
        self._template = meta_copy(model)  # the structure, to rebuild full modules from state dicts

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """Around one micro-batch's forward and backward; ``last``: the gradient is synchronised
        after this one (earlier micro-batches of the step only accumulate locally)."""
        return nullcontext()

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradients of one micro-batch's mean loss (scaled for accumulation here).

        Under context parallelism every rank of a group holds the same loss, but the gradient of
        its own tokens only: the sum over the group is the sample's gradient, and the strategies
        average over all ranks, so the loss is scaled by the group's size."""
        (loss * self.cfg.dist.context_parallel / self.accum).backward()

    @abstractmethod
    def step(self) -> StepResult:
        """Clip, take the optimiser step unless the gradient is not finite, advance the
        learning-rate schedule, zero the gradients."""

    @abstractmethod
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights, on whatever this rank holds."""

    @abstractmethod
    def full_state_dict(self, ema: bool = True) -> dict[str, Tensor] | None:
        """Collective. The whole EMA (or raw) weights as fp32 CPU tensors on rank 0; None elsewhere."""

    def ema_model(self, all_ranks: bool = False) -> nn.Module | None:
        """Collective. A module with the whole EMA weights, in eval mode, on rank 0 (None
        elsewhere), or with ``all_ranks`` on every rank (broadcast from rank 0)."""
        state = self.full_state_dict(ema=True)
        if state is None and not all_ranks:
            return None
        module = copy.deepcopy(self._template).to_empty(device=self.env.device)
        if state is not None:
            module.load_state_dict(state)
        if all_ranks and self.env.distributed:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)
        return module.eval().requires_grad_(False)

    @contextmanager
    def ema_for_sampling(self) -> Iterator[tuple[nn.Module, bool]]:
        """Collective. The EMA weights as a module every rank samples with, in eval mode, and
        whether its forward pass is collective (every rank must then call it equally often).
        Here a whole copy on every rank; sharded strategies lend their sharded model instead."""
        yield self.ema_model(all_ranks=True), False

    @abstractmethod
    def save(self, directory: Path) -> Future | None:
        """Collective. Write weights, EMA and optimiser state into ``directory``; an asynchronous
        save returns the future of its completion."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Collective. Restore what :meth:`save` wrote."""

    @classmethod
    @abstractmethod
    def holds_checkpoint(cls, directory: Path) -> bool:
        """Tell whether ``directory`` holds a checkpoint in this strategy's layout."""

    @classmethod
    @abstractmethod
    def read_weights(cls, directory: Path, model: nn.Module, ema: bool = True) -> tuple[dict[str, Tensor], Path]:
        """Read, offline (no process group), the whole EMA (or raw) weights of a checkpoint this
        strategy saved into ``directory``; return them and the file or directory they came from. Where the
        layout states the tensors' shapes, they are checked against ``model`` (on the meta
        device: dis_dist.models.spec.check_weights) before anything is allocated."""

    @abstractmethod
    def local_numel(self) -> dict[str, int]:
        """Elements this rank stores of the parameters, the optimiser states and the EMA."""

    # -- shared by the strategies whose optimiser the trainer's torch optimizer is --------------
    def _clip_and_step(self, params: Iterable[Tensor]) -> StepResult:
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(list(params), clip if clip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # a DTensor (FSDP)
            norm = norm.full_tensor()
        norm_value = float(norm)
        skipped = not math.isfinite(norm_value)
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm_value, skipped)


@torch.no_grad()
def swap_values(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    """Exchange the values of the tensors of ``a`` and ``b`` pairwise, in place, with one tensor's
    worth of extra memory at a time (twice is the identity, bit for bit)."""
    for x, y in zip(a, b):
        kept = x.clone()
        x.copy_(y)
        y.copy_(kept)


@torch.no_grad()
def lerp_ema(ema: Sequence[Tensor], current: Sequence[Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * current, tensor by tensor in one foreach call (the
    current values cast to the EMA's dtype): the EMA update of every strategy."""
    torch._foreach_lerp_(list(ema), [c.to(e.dtype) for c, e in zip(current, ema)], 1.0 - decay)


def optimizer_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the tensors in a torch optimiser's state (local shards for DTensors)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and value.numel() > 1:
                total += local_tensor(value).numel()
    return total


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t
