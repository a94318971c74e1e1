"""All file and object-store I/O goes through fsspec: a path may be local or ``s3://...``.

S3 settings come from the usual AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``) or
from explicit storage options (``{"endpoint_url": ...}``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from dis_dist.errors import DataError

StorageOptions = dict[str, Any]


def storage_options_for(url: str, options: StorageOptions | None = None) -> StorageOptions:
    """fsspec options for ``url``: for s3://, the endpoint from the environment if not given."""
    options = dict(options or {})
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "client_kwargs" not in options:
            options["endpoint_url"] = endpoint
    return options


def filesystem(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL or local path."""
    try:
        return url_to_fs(url, **storage_options_for(url, options))
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {url!r}: {e}") from None


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def check_access(url: str, options: StorageOptions | None = None, *, must_exist: bool = True) -> None:
    """Fail early, with the URL in the message, when ``url`` cannot be reached (bad bucket,
    missing credentials, no such directory)."""
    fs, path = filesystem(url, options)
    try:
        exists = fs.exists(path)
    except Exception as e:  # botocore's credential and endpoint errors, permission errors
        raise DataError(f"cannot access {url!r}: {type(e).__name__}: {e}") from None
    if must_exist and not exists:
        raise DataError(f"{url!r} does not exist")


def read_bytes(url: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(url, options)
    with fs.open(path, "rb") as f:
        return f.read()


def write_error(url: str, e: OSError, fix: str = "free space there or write elsewhere") -> DataError:
    """A failed local write as one line: the path, the condition in words, the fix."""
    conditions = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}
    return DataError(f"cannot write {url!r}: {conditions.get(e.errno, e.strerror or str(e))}; {fix}")


def write_atomic(url: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` so that ``url`` is either absent or complete: locally a temporary name
    renamed into place (removed again when the write fails: a full disk, a read-only one, is a
    DataError naming ``url``); on object stores a single PUT (objects appear whole)."""
    fs, path = filesystem(url, options)
    if is_local(url):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise write_error(url, e) from None
    else:
        fs.pipe_file(path, data)


def check_writable(url: str, options: StorageOptions | None = None, fix: str = "write elsewhere") -> None:
    """Fail early when a local output directory cannot be made or written to (a read-only disk,
    one without space): creates the directory, then a file in it that is removed again."""
    if not is_local(url):
        return  # an object store answers only to a write; credentials were checked by check_access
    path = filesystem(url, options)[1]
    probe = os.path.join(path, f".write-test-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0")
        os.remove(probe)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(probe)
        raise write_error(url, e, fix) from None


# -- reading inputs that may be hostile --------------------------------------------------------

MAX_INPUT_MB = 256  # the default cap on one input image file


class UnusableInput(DataError):
    """One input the encoder leaves out (the run goes on): ``why``, a few words, is the reason
    the skips are counted by; the message names the input and adds the details."""

    def __init__(self, path: str, why: str, detail: str = "") -> None:
        super().__init__(f"{path}: {why}" + (f" ({detail})" if detail else ""))
        self.why = why


_FILE_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def _check_file(path: str, is_regular: bool, kind: str, size: int, max_bytes: int | None) -> None:
    if not is_regular:
        raise UnusableInput(path, f"not a regular file ({kind})")
    if max_bytes is not None and size > max_bytes:
        raise UnusableInput(path, "too large", f"{size} bytes, over the cap of {max_bytes} (--max-file-mb)")


def _check_stat(path: str, st: os.stat_result, max_bytes: int | None) -> None:
    kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "special file")
    _check_file(path, stat.S_ISREG(st.st_mode), kind, st.st_size, max_bytes)


def _unusable(path: str, e: OSError) -> UnusableInput:
    if e.errno == errno.ELOOP:
        return UnusableInput(path, "symlink loop")
    if e.errno == errno.ENOENT:
        return UnusableInput(path, "broken symlink" if os.path.islink(path) else "missing")
    return UnusableInput(path, "cannot read", e.strerror or str(e))


@contextmanager
def open_input(fsys: fsspec.AbstractFileSystem, path: str, max_bytes: int | None = None) -> Iterator[IO[bytes]]:
    """An input file opened for reading, if it is a regular file (links followed) of at most
    ``max_bytes``; else UnusableInput saying why. The one place that decides whether an input is
    read: a FIFO, a device, a directory, a broken link or a link loop is never opened or read."""
    if not isinstance(fsys, LocalFileSystem):
        try:
            info = fsys.info(path)
        except FileNotFoundError:
            raise UnusableInput(path, "missing") from None
        except OSError as e:
            raise UnusableInput(path, "cannot read", str(e)) from None
        _check_file(path, info.get("type") == "file", str(info.get("type")), int(info.get("size") or 0), max_bytes)
        with fsys.open(path, "rb") as f:
            yield f
        return
    try:
        _check_stat(path, os.stat(path), max_bytes)  # before opening: a device is never opened
        # O_NONBLOCK: a FIFO swapped in since the stat does not block the open (or a regular file's reads)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise _unusable(path, e) from None
    with os.fdopen(fd, "rb") as f:
        _check_stat(path, os.fstat(fd), max_bytes)  # the file that was opened
        yield f


def read_input(fsys: fsspec.AbstractFileSystem, path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of an input file (see :func:`open_input`), never more than ``max_bytes``: the
    read itself is bounded too, for a file that grows or reports a wrong size."""
    with open_input(fsys, path, max_bytes) as f:
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as e:
            raise UnusableInput(path, "cannot read", e.strerror or str(e)) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise UnusableInput(path, "too large", f"over the cap of {max_bytes} bytes (--max-file-mb) while read")
    return data


@contextmanager
def open_for_read(url: str, options: StorageOptions | None = None, cache_dir: str | None = None) -> Iterator[IO]:
    """A binary file object; remote files go through a local cache directory when one is given."""
    if cache_dir and not is_local(url):
        protocol = url.split("://", 1)[0]
        opts = {protocol: storage_options_for(url, options), "filecache": {"cache_storage": cache_dir}}
        with fsspec.open(f"filecache::{url}", "rb", **opts) as f:
            yield f
        return
    fs, path = filesystem(url, options)
    with fs.open(path, "rb") as f:
        yield f


def register_webdataset_handler() -> None:
    """Let webdataset open any fsspec URL (s3://, gs://, ...) it has no handler for."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function)

    def fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO:
        fs, path = filesystem(url)
        return fs.open(path, mode)

    for scheme in ("s3", "gcs", "az", "abfs", "memory"):
        gopen.gopen_schemes.setdefault(scheme, fsspec_gopen)
