"""One job per run directory: a lease file naming its holder, renewed while the job trains.

``run_dir/run.lock`` holds the holder's host, pid, SLURM job id and when it last renewed its
lease. It is created with a hard link from a file of the job's own (atomic on NFS and Lustre,
where ``flock`` may be unsupported or local to one client), and replaced with an atomic rename.
A job that finds a lease refuses to start, naming the holder, unless the lease is stale (not
renewed for ``lease_s`` seconds: its holder died) or its own SLURM job's (a requeued job taking
over from its earlier run). The holder renews the lease every ``lease_s / 10`` seconds from a
background thread; if it finds another job's lease in its place (it stalled for longer than the
lease), :meth:`RunLock.check` raises, so it stops before writing anything more.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from dis_dist.distributed.env import DistEnv
from dis_dist.errors import RunDirError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


@dataclass
class Lease:
    host: str
    pid: int
    job: str | None  # SLURM_JOB_ID
    token: str  # this lease's own id: tells a lease apart from another of the same process
    renewed: float  # time.time() of the last renewal

    @classmethod
    def mine(cls) -> Lease:
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), uuid.uuid4().hex, time.time())

    def describe(self, now: float) -> str:
        job = f"SLURM job {self.job}" if self.job else "a job"
        return f"{job} on {self.host} (pid {self.pid}), lease renewed {now - self.renewed:.0f} s ago"


def _read(path: Path) -> Lease | None:
    """Read the lease in ``path``; None when there is none. A file that is not a lease counts as one
    renewed at its modification time (a lease being written, or damaged)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return Lease(str(data["host"]), int(data["pid"]), data["job"], str(data["token"]), float(data["renewed"]))
    except (ValueError, KeyError, TypeError):
        return Lease("?", 0, None, "", path.stat().st_mtime)


class RunLock:
    """Holds the lease on ``run_dir`` (see the module docstring); a context manager."""

    def __init__(self, run_dir: Path, lease_s: float) -> None:
        self.run_dir, self.lease_s = Path(run_dir), lease_s
        self.path = self.run_dir / LOCK_FILE
        self.lease = Lease.mine()
        self.lost: Lease | None = None  # another job's lease found in place of ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease or raise RunDirError naming its holder; start renewing it."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot use run_dir {str(self.run_dir)!r}: {_reason(e)}") from None
        try:
            self._create()
        except FileExistsError:
            self._take_over()
        except OSError as e:
            raise RunDirError(f"cannot use run_dir {str(self.run_dir)!r}: {_reason(e)}") from None
        self._thread = threading.Thread(target=self._renew_loop, name="run-lock", daemon=True)
        self._thread.start()

    def _write_own(self) -> Path:
        tmp = self.run_dir / f".{LOCK_FILE}.{self.lease.token}"
        tmp.write_text(json.dumps(asdict(self.lease)))
        return tmp

    def _create(self) -> None:
        """Create the lock file holding our lease; FileExistsError when there is one."""
        tmp = self._write_own()
        try:
            os.link(tmp, self.path)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise FileExistsError(str(self.path)) from None
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # A file system without hard links: an exclusive create (atomic on NFSv3 and later).
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self) -> None:
        holder = _read(self.path)
        now = time.time()
        if holder is None:  # released meanwhile
            try:
                return self._create()
            except FileExistsError:
                raise RunDirError(f"run_dir {str(self.run_dir)!r}: another job took it at the same time") from None
        stale = now - holder.renewed > self.lease_s
        requeued = holder.job is not None and holder.job == self.lease.job
        if not (stale or requeued):
            raise RunDirError(
                f"run_dir {str(self.run_dir)!r} is in use by {holder.describe(now)}: one job per run_dir. Wait for "
                f"it to end, or use another run_dir; if that job is dead, its lease lapses {self.lease_s:.0f} s after "
                f"its last renewal, or remove {self.path}"
            )
        os.replace(self._write_own(), self.path)
        time.sleep(min(1.0, self.lease_s / 100))  # another job taking over at the same moment: one wins
        if (now_holder := _read(self.path)) is None or now_holder.token != self.lease.token:
            raise RunDirError(f"run_dir {str(self.run_dir)!r} was taken over by "
                               f"{now_holder.describe(time.time()) if now_holder else 'another job'} at the same time")
        log.warning("took over run_dir %s from %s (%s)", self.run_dir, holder.describe(now),
                    "its lease was stale" if stale else "an earlier run of this SLURM job")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 10):
            self.renew()

    def renew(self) -> None:
        """Renew the lease, unless another job's has replaced it (then :meth:`check` raises)."""
        holder = _read(self.path)
        if holder is None or holder.token != self.lease.token:
            self.lost = holder or Lease("?", 0, None, "", 0.0)
            self._stop.set()
            return
        self.lease.renewed = time.time()
        try:
            os.replace(self._write_own(), self.path)
        except OSError as e:  # a full or failing disk: the checkpoint writes will say more
            log.warning("could not renew the lease %s: %s", self.path, _reason(e))

    def check(self) -> None:
        """Raise RunDirError when another job has taken the run directory over."""
        if self.lost is not None:
            raise RunDirError(
                f"run_dir {str(self.run_dir)!r} was taken over by {self.lost.describe(time.time())} while this job "
                f"held it (this job stalled for over {self.lease_s:.0f} s?): stopping without writing more"
            )

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = _read(self.path)
        if holder is not None and holder.token == self.lease.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def hold_run_dir(env: DistEnv, run_dir: Path, lease_s: float) -> Iterator[RunLock | None]:
    """Collective. Rank 0 holds ``run_dir``'s lease while the block runs (None elsewhere, and
    with ``lease_s`` 0: no lock); when it cannot have it, every rank raises RunDirError before
    touching anything."""
    lock, error = None, None
    if env.is_main and lease_s:
        lock = RunLock(run_dir, lease_s)
        try:
            lock.acquire()
        except RunDirError as e:
            lock, error = None, str(e)
    if env.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunDirError(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _reason(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "it is on a read-only file system"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in its way (not a directory)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on its device"
    return e.strerror or str(e)
