"""Where this process runs: rank, world size and device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dis_dist.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's GPU when CUDA is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def single_process_env(device: str = "auto") -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, device=resolve_device(device))
