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


def worker_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) of an independent worker (an encode job, say) from torchrun's
    RANK/WORLD_SIZE, a SLURM array (SLURM_ARRAY_TASK_ID/COUNT/MIN) or SLURM tasks
    (SLURM_PROCID/SLURM_NTASKS); (0, 1) otherwise."""
    import os

    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        base = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - base, int(env["SLURM_ARRAY_TASK_COUNT"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1
