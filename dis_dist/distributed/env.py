"""Where this process runs: rank, world size and device; the process group of a training job.

Ranks come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, launched by
``srun`` without torchrun, from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first
host of SLURM_JOB_NODELIST as master). NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from dis_dist.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is up (even a group of one, as ``ddp``/``fsdp`` need)."""
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_to_main(self, obj: T) -> list[T] | None:
        """Collective. Gather every rank's picklable ``obj``, in rank order, to rank 0; return None elsewhere."""
        if not self.distributed:
            return [obj]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, obj)
        return everyone if self.is_main else None


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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-005,010],cpu1" -> "gpu003"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def ranks_from_env(env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """torchrun's variables, or their equivalents derived from SLURM's; None for a lone process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"],
            "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
            "LOCAL_WORLD_SIZE": env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", str(DEFAULT_PORT)),
        }
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        nodes = int(env.get("SLURM_NNODES", "1"))
        # A port per job, so two jobs sharing a node do not collide.
        port = env.get("MASTER_PORT") or str(DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000)
        return {
            "RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(int(env["SLURM_NTASKS"]) // max(1, nodes)),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            "MASTER_PORT": port,
        }
    return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
HOST_MMAP_THRESHOLD = 1 << 20


def bound_host_heap() -> None:
    """Allocations of 1 MB and more straight from the OS, handed back when freed. glibc's default
    raises that threshold to the size of the blocks freed so far (up to 32 MB), after which
    gathered shards, gradients and optimiser temporaries come from the heap, which keeps every
    page it ever held: measured on 2 CPU ranks of DiS-B/2 under FSDP, 0.9 GB per rank of
    resident memory (tools/bench_scale.py). The price is a page fault per page of every such
    block, each time: the trainer pays it where several CPU ranks share the memory (a lone CPU
    process keeps glibc's default: the demo's steps 1.2x to 1.6x faster). Glibc only; elsewhere a
    no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def init_distributed(strategy: str, device: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Start the process group this job needs and return where this process runs.

    ``single`` in a lone process needs no group; every other strategy gets one, even of size one.
    """
    ranks = ranks_from_env()
    if ranks is None and strategy == "single":
        return single_process_env(device)
    ranks = ranks or {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "0")}
    os.environ.update(ranks)  # what DeepSpeed and torch's env:// rendezvous read
    rank, world, local = int(ranks["RANK"]), int(ranks["WORLD_SIZE"]), int(ranks["LOCAL_RANK"])
    where = resolve_device(device, local)
    if not dist.is_initialized():
        if where.type == "cuda":
            torch.cuda.set_device(where)
        backend = "nccl" if where.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_min)
        where_to_meet: dict = {"store": _agent_store(timeout)}
        if where_to_meet["store"] is None:
            port = ranks["MASTER_PORT"]
            # A group of one needs no agreed port: any free one.
            where_to_meet = {"init_method": f"tcp://127.0.0.1:{_free_port()}" if port == "0" else "env://"}
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timeout,
            device_id=where if where.type == "cuda" else None, **where_to_meet,
        )
        log.info("process group: rank %d of %d (local %d), %s on %s", rank, world, local, backend, where)
    return DistEnv(rank, world, local, where, int(ranks["LOCAL_WORLD_SIZE"]))


def context_parallel_group(env: DistEnv, k: int) -> dist.ProcessGroup | None:
    """Collective. The context-parallel group of this rank: the ``cp`` axis of a (dp, cp) device
    mesh over all ranks, so that consecutive ranks (on one node, where links are fastest) split
    each sample's tokens and ranks k apart hold different samples. None for k = 1."""
    if k == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (env.world_size // k, k), mesh_dim_names=("dp", "cp"))
    return mesh.get_group("cp")


def _agent_store(timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's store, with keys of their own for each restart of the workers.

    torchrun (c10d rendezvous) serves every restart from the same store and port, and the
    process groups of restarted workers would read the addresses the previous, dead workers
    published there (gloo then fails to connect, NCCL hangs): a prefix per restart avoids that.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("MASTER_PORT") == "0":  # torchrun binds a free port but tells workers 0
        raise ConfigError("torchrun --master_port=0 does not tell the workers which port it chose (they "
                          "would wait forever): use --standalone, or give --master_port a free port")
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/dis_dist/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) of an independent worker (an encode job, say) from torchrun's
    RANK/WORLD_SIZE, a SLURM array (SLURM_ARRAY_TASK_ID/COUNT/MIN) or SLURM tasks
    (SLURM_PROCID/SLURM_NTASKS); (0, 1) otherwise."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        base = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - base, int(env["SLURM_ARRAY_TASK_COUNT"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1
