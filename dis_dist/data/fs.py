"""All file and object-store I/O goes through fsspec: a path may be local or ``s3://...``.

S3 settings come from the usual AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``) or
from explicit storage options (``{"endpoint_url": ...}``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

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


def write_atomic(url: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` so that ``url`` is either absent or complete: locally a temporary name
    renamed into place; on object stores a single PUT (objects appear whole)."""
    fs, path = filesystem(url, options)
    if is_local(url):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


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
