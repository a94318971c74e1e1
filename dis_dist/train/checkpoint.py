"""Checkpoint directories: one per saved step, written under a temporary name, marked complete
last and then renamed, so a directory named ``step_*`` with a marker is always whole.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from dis_dist.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


class CheckpointManager:
    """Saves into ``root/step_XXXXXXXX``; keeps the newest ``keep_last`` complete ones and those
    whose step is a multiple of ``keep_every`` (when positive)."""

    def __init__(self, root: str | Path, keep_last: int, keep_every: int = 0) -> None:
        self.root = Path(root)
        self.keep_last, self.keep_every = keep_last, keep_every
        self._pending: tuple[Future, Callable[[], None]] | None = None

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            m = _STEP_DIR.match(path.name)
            if m and path.is_dir() and is_complete(path):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def save(
        self, step: int, write: Callable[[Path], object], *, is_main: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> Path:
        """Run ``write(tmp_dir)`` (on every rank of a job, into one shared directory), then mark
        it complete, rename it into place and prune (rank 0, once every rank has written).

        When ``write`` returns a future (an asynchronous save), completing the checkpoint waits
        for :meth:`finish`: the next save, or the end of training, calls it."""
        self.finish()
        final = self.path_for(step)
        tmp = self.root / f".tmp_{final.name}"
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        pending = write(tmp)

        def complete() -> None:
            barrier()
            if is_main:
                (tmp / MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                self.prune()
            barrier()

        if not isinstance(pending, Future):
            complete()
        else:
            self._pending = (pending, complete)
        return final

    def finish(self) -> None:
        """Wait for an asynchronous save in flight, then complete its checkpoint (collective)."""
        if self._pending is not None:
            future, complete = self._pending
            self._pending = None
            future.result()
            complete()

    def prune(self) -> None:
        """Delete complete checkpoints that retention does not keep, and leftovers of
        interrupted saves."""
        for step, path in self.complete()[: -self.keep_last]:
            if not (self.keep_every and step % self.keep_every == 0):
                shutil.rmtree(path, ignore_errors=True)
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(".tmp_") or (
                    _STEP_DIR.match(path.name) and path.is_dir() and not is_complete(path)
                ):
                    log.warning("removing incomplete checkpoint %s", path)
                    shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume: str, manager: CheckpointManager) -> Path | None:
    """``--resume``: "auto" (newest complete checkpoint, or none), "none", or a checkpoint path."""
    if resume == "none":
        return None
    if resume == "auto":
        return manager.latest()
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume!r}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(
            f"--resume {resume!r} is incomplete (no {MARKER} marker): it was cut off while "
            f"being written; pick an older checkpoint or use --resume auto"
        )
    return path
