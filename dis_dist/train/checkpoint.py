"""Checkpoint directories: one per saved step, written under a temporary name, marked complete
last and then renamed, so a directory named ``step_*`` with a marker is always whole. The
marker lists every file with its size, so a checkpoint damaged later (a truncated copy, a lost
shard) is found before anything is loaded from it.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from dis_dist.errors import CheckpointError
from dis_dist.train.safe_load import DataOnlyReader, load_torch

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
CHECKPOINT_FILES = (MARKER, "model.json", "trainer.json")  # what tells a checkpoint directory
DISK_FULL_BYTES = 1 << 20  # free space under which a failed write is taken for a full disk


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def file_sizes(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``directory``."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def verify_checkpoint(path: Path) -> None:
    """Check a complete checkpoint without loading its tensors: every file its marker lists is
    there with its size, every torch file among them unpickles as plain tensors and containers
    (memory-mapped: no tensor data is read) and DCP's metadata as DCP metadata. Raises
    CheckpointError naming the first bad file."""
    marker = path / MARKER
    try:
        recorded = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{marker} is unreadable: {e}") from None
    if recorded is not None:
        if not isinstance(recorded, dict):
            raise CheckpointError(f"{marker} is damaged: its file list is not an object")
        for name, size in recorded.items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise CheckpointError(f"{marker} is damaged: it lists {name!r}, outside the checkpoint")
            file = path / name
            actual = file.stat().st_size if file.is_file() else None
            if actual != size:
                found = "missing" if actual is None else f"{actual} bytes"
                raise CheckpointError(f"{file} is {found}; the checkpoint was written with {size} bytes")
    # What is read on resume: the listed files (written by an older version: every torch file).
    torch_files = [path / n for n in recorded if n.endswith(".pt")] if recorded else sorted(path.rglob("*.pt"))
    for file in torch_files:
        load_torch(file, map_location="cpu", mmap=True)
    dcp = path / "dcp"
    if dcp.is_dir():
        DataOnlyReader(str(dcp)).read_metadata()


class CheckpointManager:
    """Saves into ``root/step_XXXXXXXX``; keeps the newest ``keep_last`` complete ones and those
    whose step is a multiple of ``keep_every`` (when positive)."""

    def __init__(self, root: str | Path, keep_last: int, keep_every: int = 0) -> None:
        self.root = Path(root)
        self.keep_last, self.keep_every = keep_last, keep_every
        self._pending: tuple[Future, Callable[[], None], Path, Path] | None = None

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
        with self._full_disk_is_one_error(final, tmp):
            pending = write(tmp)

        def complete() -> None:
            barrier()
            if is_main:
                with self._full_disk_is_one_error(final, tmp):
                    record = {"step": step, "time": time.time(), "files": file_sizes(tmp)}
                    (tmp / MARKER).write_text(json.dumps(record))
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                self.prune()
            barrier()

        if not isinstance(pending, Future):
            complete()
        else:
            self._pending = (pending, complete, final, tmp)
        return final

    def finish(self) -> None:
        """Wait for an asynchronous save in flight, then complete its checkpoint (collective)."""
        if self._pending is not None:
            future, complete, final, tmp = self._pending
            self._pending = None
            with self._full_disk_is_one_error(final, tmp):
                future.result()
            complete()

    @contextmanager
    def _full_disk_is_one_error(self, final: Path, tmp: Path) -> Iterator[None]:
        """A write that fails on a full disk (``torch.save`` says only "unexpected pos"; DCP wraps
        the OSError) becomes one CheckpointError naming the disk and the checkpoint kept; the
        partial files go."""
        try:
            yield
        except Exception as e:
            if not _disk_full(self.root, e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            kept = self.latest()
            raise CheckpointError(
                f"no space left on the device of {self.root} while writing checkpoint {final.name}: it was not "
                f"saved (its partial files are removed); the newest complete checkpoint, "
                f"{kept.name if kept else 'none'}, is intact. Free space, then resume with --resume auto"
            ) from None

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


def _disk_full(root: Path, error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(root).free < DISK_FULL_BYTES
    except OSError:
        return False


def resolve_resume(resume: str, manager: CheckpointManager) -> Path | None:
    """``--resume``: "auto" (newest complete checkpoint, or none), "none", or a checkpoint path."""
    if resume == "none":
        return None
    if resume == "auto":
        return manager.latest()
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume!r}: no such checkpoint directory")
    if not _STEP_DIR.match(path.name) and not any((path / name).is_file() for name in CHECKPOINT_FILES):
        raise CheckpointError(
            f"--resume {resume!r} is not a checkpoint (it holds none of {', '.join(CHECKPOINT_FILES)}): give a "
            f"run's checkpoints/step_* directory, or --resume auto"
        )
    if not is_complete(path):
        raise CheckpointError(
            f"--resume {resume!r} is incomplete (no {MARKER} marker): it was cut off while "
            f"being written; pick an older checkpoint or use --resume auto"
        )
    return path
