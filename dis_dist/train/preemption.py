"""Stopping a run cleanly when the cluster asks: SIGUSR1 (SLURM's warning before a time limit
or preemption), SIGUSR2 (submitit's), SIGTERM (``scontrol requeue``, preemption, ``kill``) or a
request file (what ``slurm/train_dis_h.sbatch`` writes when its own shell is signalled) set a
flag; at the next step boundary every rank learns whether any rank saw one, and the trainer
saves and stops.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from dis_dist.distributed.env import DistEnv

log = logging.getLogger(__name__)

# USR1: SLURM's --signal warning; USR2: submitit's preemption/timeout signal; TERM: requeue, kill.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
REQUEST_FILE = "STOP_REQUESTED"  # in the run directory


class StopRequest:
    """A stop flag raised by signals or by ``run_dir/STOP_REQUESTED``, agreed on by all ranks.

    ``poll()`` is called once per step: it starts a one-element all-reduce (MAX) of this rank's
    flag and returns the result of the one started at the previous step, so that reading it
    rarely waits; a stop is acted on one step after it is requested. The flag travels on the
    CPU (gloo: a group of its own when training uses NCCL), so polling never syncs a GPU.
    """

    def __init__(self, env: DistEnv, run_dir: Path) -> None:
        self.env = env
        self.request_file = run_dir / REQUEST_FILE
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._pending: tuple[torch.Tensor, object] | None = None
        self._group = None  # the default group, when it is gloo
        if env.distributed and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pending is not None:
            self._pending[1].wait()  # no collective left in flight
            self._pending = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            log.warning("rank %d received %s: saving a checkpoint at the next step boundary",
                        self.env.rank, self.reason)

    def _local(self) -> bool:
        if self.reason is None and self.env.is_main and self.request_file.exists():
            self.reason = f"request file {self.request_file}"
            log.warning("found %s: saving a checkpoint at the next step boundary", self.request_file)
        return self.reason is not None

    def poll(self) -> bool:
        """Whether any rank has been asked to stop (collective; one step of delay when distributed)."""
        if not self.env.distributed:
            return self._local()
        flag = torch.tensor([int(self._local())])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        previous, self._pending = self._pending, (flag, work)
        if previous is None:
            return False
        previous[1].wait()
        return bool(previous[0].item())

    def clear(self) -> None:
        """Forget a handled request file (so a resumed run does not stop at once)."""
        if self.env.is_main:
            self.request_file.unlink(missing_ok=True)
