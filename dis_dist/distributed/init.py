"""Meta-device initialisation: the trainer builds the model on the meta device (no storage), a
strategy places or shards it, and only then does each rank give storage to what it keeps and fill
it with initial values. Every parameter's value comes from its own generator, seeded by the run
seed and the parameter's name, computed whole and sliced to the rank's shard: the full initial
weights are the same at any world size and under any strategy, and no rank ever holds more than
its shards plus one parameter's full value.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dis_dist.errors import ConfigError


def on_meta(model: nn.Module) -> bool:
    """Whether ``model`` still waits for storage (built under ``torch.device("meta")``)."""
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, params: Iterable[tuple[str, nn.Parameter]] | None = None) -> None:
    """Fill ``params`` (default: all of ``model``'s, by name; their storage already allocated:
    plain tensors or sharded DTensors) with their initial values, ``model.initial_value(name, seed)``."""
    if not hasattr(model, "initial_value"):
        raise ConfigError(f"{type(model).__name__} was built on the meta device but has no initial_value(name, seed)")
    for name, p in model.named_parameters() if params is None else params:
        full = model.initial_value(name, seed).to(device=p.device, dtype=p.dtype)
        if hasattr(p, "device_mesh"):  # a DTensor: keep this rank's slice (no communication)
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(full)
        else:
            p.copy_(full)


def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Storage on ``device`` for a meta-device ``model`` (or for each rank's shards, when a
    strategy has sharded it on the meta device), filled with the initial values. A model that
    already holds weights is returned as it is."""
    if not on_meta(model):
        return model
    model.to_empty(device=device)
    init_parameters(model, seed)
    return model
