"""The members of a shard: a webdataset ``.tar`` of ``.npy`` arrays and ``.cls`` labels.

Each sample of a shard is ``<key>.latent.npy`` (float16), optionally ``<key>.latent_flip.npy``
(the latent of the horizontally flipped image) and ``<key>.cls`` (the label as text). Shards are
written byte for byte as webdataset's own ``TarWriter`` writes them (its headers filled in
directly, which is much faster) and read back here in memory, without copying: the tar
headers are parsed (and their checksums checked) and each ``.npy`` payload becomes an array that
views the shard's bytes.
"""

from __future__ import annotations

import ast
import functools
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from dis_dist.errors import DataError

# -- writing ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _npy_prefix(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The bytes ``np.save`` writes before the data of a C-ordered array of this dtype and shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    """``array`` as a .npy file, the bytes ``np.save`` writes (its header is cached per dtype and
    shape: a shard's arrays share one)."""
    if array.flags.c_contiguous and not array.dtype.hasobject:
        prefix = _npy_prefix(array.dtype, array.shape)
        if prefix[6:8] == b"\x01\x00":  # version 1.0 (np.save's choice unless the header is huge)
            return prefix + array.tobytes()
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_BLOCK, _RECORD = 512, 20 * 512  # tar's block, and the record its end is padded to (tar -b20)


@functools.cache
def _header_template() -> tuple[bytes, int]:
    """The ustar header TarWriter gives a member (mode 0444, owner bigdata, mtime 0), with the name,
    size and checksum fields cleared; and the byte sum of that header with the checksum field
    read as spaces (the tar checksum's base)."""
    import tarfile

    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode, info.uname, info.gname = 0, 0, 0o444, "bigdata", "bigdata"
    header = bytearray(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    if len(header) != _BLOCK or bytes(header[257:263]) != b"ustar\x00":
        raise RuntimeError("tarfile wrote an unexpected header")  # pragma: no cover
    header[0:100] = bytes(100)
    header[124:136] = bytes(12)
    header[148:156] = b" " * 8
    return bytes(header), sum(header)


def _fast_member(name: bytes, size: int) -> bytes:
    """TarWriter's ustar header of a regular file ``name`` (ASCII, at most 100 bytes) of ``size`` bytes."""
    template, base = _header_template()
    size_field = b"%011o\x00" % size
    checksum = base + sum(name) + sum(size_field)
    return b"".join((name, bytes(100 - len(name)), template[100:124], size_field, template[136:148],
                     b"%06o\x00 " % checksum, template[156:]))


def _members(s: dict[str, Any]) -> dict[str, bytes]:
    members = {"latent.npy": _npy(s["latent"]), "cls": str(int(s["cls"])).encode()}
    if s.get("latent_flip") is not None:
        members["latent_flip.npy"] = _npy(s["latent_flip"])
    return members


def build_shard(samples: list[dict[str, Any]]) -> bytes:
    """Write samples {"key", "latent", "latent_flip"?, "cls"} into a tar and return its bytes:
    the bytes webdataset's ``TarWriter`` writes (ustar; the timestamps fixed, so the same samples
    give the same bytes). The headers are filled in directly (about 50x faster than tarfile's);
    a key that a ustar header cannot hold (non-ASCII, or over 100 bytes with its extension)
    goes through ``TarWriter`` itself."""
    if not all(str(s["key"]).isascii() and len(str(s["key"])) + len(".latent_flip.npy") <= 100 for s in samples):
        return _build_shard_tarwriter(samples)
    parts: list[bytes] = []
    offset = 0
    for s in samples:
        key = str(s["key"]).encode()
        for ext, payload in sorted(_members(s).items()):  # TarWriter's order: sorted extensions
            pad = -len(payload) % _BLOCK
            parts += [_fast_member(key + b"." + ext.encode(), len(payload)), payload, bytes(pad)]
            offset += _BLOCK + len(payload) + pad
    offset += 2 * _BLOCK  # the two zero blocks that end an archive, then padding to a whole record
    parts.append(bytes(2 * _BLOCK + (-offset % _RECORD)))
    return b"".join(parts)


def _build_shard_tarwriter(samples: list[dict[str, Any]]) -> bytes:
    """:func:`build_shard` by webdataset's ``TarWriter`` (for keys the fast path does not take)."""
    from webdataset import TarWriter

    buf = io.BytesIO()
    with TarWriter(buf, encoder=False, mtime=0) as tar:
        for s in samples:
            tar.write({"__key__": s["key"], **_members(s)})
    return buf.getvalue()


# -- reading ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    d = ast.literal_eval(header.decode("latin1"))
    if not isinstance(d, dict) or not isinstance(d.get("shape"), tuple):
        raise ValueError(f"bad .npy header {header[:80]!r}")
    if d.get("fortran_order"):
        raise ValueError("Fortran-ordered arrays are not used in latent shards")
    shape = d["shape"]
    if not all(isinstance(n, int) and 0 <= n < 2**31 for n in shape):
        raise ValueError(f"bad .npy shape {shape!r}")
    return np.dtype(d["descr"]), shape


# What a damaged .npy header can make the parsers above raise.
_NPY_ERRORS = (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError)


def npy_array(data: bytes | memoryview) -> np.ndarray:
    """Return a .npy payload as a (read-only, zero-copy) array. Every sample of a shard has the same
    header, so parsing it is a cache lookup: this is ~70x faster than np.load per sample.
    Raises ValueError for anything that is not a whole .npy array."""
    data = memoryview(data)
    if bytes(data[:6]) != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not a .npy payload")
    if data[6] == 1:
        length, start = int.from_bytes(data[8:10], "little"), 10
    else:
        length, start = int.from_bytes(data[8:12], "little"), 12
    try:
        dtype, shape = _npy_header(bytes(data[start : start + length]))
        return np.frombuffer(data, dtype=dtype, offset=start + length, count=math.prod(shape)).reshape(shape)
    except _NPY_ERRORS as e:
        raise ValueError(f"corrupt .npy payload: {type(e).__name__}: {e}") from None


def _header_checksum_ok(header: memoryview) -> bool:
    """Check the tar header's own checksum: the byte sum with the checksum field read as spaces."""
    field_text = bytes(header[148:156]).split(b"\0", 1)[0].strip()
    try:
        stored = int(field_text, 8)
    except ValueError:
        return False
    total = int(np.frombuffer(header, dtype=np.uint8).sum(dtype=np.int64))
    return stored == total - sum(header[148:156]) + 8 * 32


def tar_members(data: memoryview) -> Iterator[tuple[str, memoryview]]:
    """Yield (name, payload) of the regular files of an in-memory tar (ustar, GNU long names,
    pax). Every header's checksum is checked; any damage raises DataError."""
    pos, end, long_name = 0, len(data), None
    while pos + 512 <= end:
        header = data[pos : pos + 512]
        if not any(header):  # the two zero blocks that end an archive
            return
        if not _header_checksum_ok(header):
            raise DataError(f"corrupt tar: the member header at byte {pos} fails its checksum")
        try:
            name = bytes(header[:100]).split(b"\0", 1)[0].decode()
            prefix = bytes(header[345:500]).split(b"\0", 1)[0].decode()
            size_field = bytes(header[124:136]).split(b"\0", 1)[0].strip()
            size = int(size_field, 8) if size_field else 0
        except ValueError as e:  # UnicodeDecodeError included
            raise DataError(f"corrupt tar: the member header at byte {pos} is unreadable ({e})") from None
        if prefix and bytes(header[257:262]) == b"ustar":
            name = f"{prefix}/{name}"
        kind = header[156:157].tobytes()
        body = pos + 512
        if body + size > end:
            raise DataError(f"truncated tar: member {name!r} needs {size} bytes, {end - body} left")
        payload = data[body : body + size]
        pos = body + (size + 511) // 512 * 512
        try:
            if kind == b"L":  # GNU long name of the next member
                long_name = bytes(payload).split(b"\0", 1)[0].decode()
                continue
            if kind == b"x":  # pax header: the path record, if any, names the next member
                for record in bytes(payload).decode().splitlines():
                    if " path=" in record:
                        long_name = record.split(" path=", 1)[1]
                continue
        except ValueError as e:
            raise DataError(f"corrupt tar: unreadable extended header of {name!r} ({e})") from None
        if kind in (b"0", b"\0"):
            yield (long_name or name), payload
        long_name = None
    raise DataError("truncated tar: no end-of-archive blocks")
