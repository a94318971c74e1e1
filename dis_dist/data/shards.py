"""The latent-cache format: webdataset ``.tar`` shards and the ``manifest.json`` beside them.

Each sample of a shard is ``<key>.latent.npy`` (float16), optionally ``<key>.latent_flip.npy``
(the latent of the horizontally flipped image) and ``<key>.cls`` (the label as text). What a
latent holds is the manifest's ``latent_kind``: ``moments`` (the posterior mean and std stacked
on the channel axis, both already multiplied by the VAE's scaling factor, so a reader draws
mean + std * eps), ``sample``, ``mean``, or ``pixels`` (the image itself in [-1, 1]).

While encoding, every finished shard gets a fragment ``_fragments/<shard>.json`` (written after
the shard, so a fragment means a complete shard); ``manifest.json`` merges the fragments.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import io
import json
import math
import mmap
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from dis_dist.data import fs
from dis_dist.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FRAGMENTS = "_fragments"
LATENT_KINDS = ("moments", "sample", "mean", "pixels")


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Skipped:
    key: str
    source: str
    reason: str


@dataclass
class CacheInfo:
    """What every shard of one cache shares (each fragment carries a copy; they must agree)."""

    vae: str  # a hub id or local directory, or "pixels"
    vae_revision: str | None
    scaling_factor: float
    resolution: int
    latent_shape: list[int]  # of one stored latent array (moments: 2C channels)
    latent_dtype: str
    latent_kind: str
    class_names: list[str]
    has_flip: bool
    num_shards: int
    encode: dict[str, Any]  # the encode settings

    @property
    def channels(self) -> int:
        """Channels of one latent as the model sees it."""
        return self.latent_shape[0] // 2 if self.latent_kind == "moments" else self.latent_shape[0]


@dataclass
class Manifest:
    format_version: int
    info: CacheInfo
    total_samples: int
    shards: list[ShardInfo]
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.info.class_names)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, url: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
            if d.get("format_version") != FORMAT_VERSION:
                raise DataError(
                    f"{url}: format version {d.get('format_version')!r}, this code reads {FORMAT_VERSION}"
                )
            return cls(
                format_version=d["format_version"],
                info=CacheInfo(**d["info"]),
                total_samples=d["total_samples"],
                shards=[ShardInfo(**s) for s in d["shards"]],
                skipped=[Skipped(**s) for s in d.get("skipped", [])],
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise DataError(f"{url} is not a valid manifest: {e}") from None


@dataclass
class Fragment:
    """The record of one finished shard."""

    info: CacheInfo
    shard: ShardInfo
    skipped: list[Skipped]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def fragment_url(root: str, shard: str) -> str:
    return fs.join(root, FRAGMENTS, shard.removesuffix(".tar") + ".json")


def load_manifest(url: str, options: fs.StorageOptions | None = None) -> Manifest:
    """The manifest of the cache at ``url`` (a directory URL, or the manifest's own URL)."""
    manifest_url = url if url.endswith(".json") else fs.join(url, MANIFEST)
    try:
        text = fs.read_bytes(manifest_url, options).decode()
    except FileNotFoundError:
        raise DataError(
            f"no manifest at {manifest_url!r}: not a latent cache, or its encode has not finished "
            f"(run tools/encode_latents.py --finalize to merge the finished shards)"
        ) from None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {manifest_url!r}: {type(e).__name__}: {e}") from None
    return Manifest.from_json(text, manifest_url)


# -- writing ----------------------------------------------------------------------------------

def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def build_shard(samples: list[dict[str, Any]]) -> bytes:
    """A tar of samples {"key", "latent", "latent_flip"?, "cls"} in webdataset's layout."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            members = {"latent.npy": _npy(s["latent"]), "cls": str(int(s["cls"])).encode()}
            if s.get("latent_flip") is not None:
                members["latent_flip.npy"] = _npy(s["latent_flip"])
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(root: str, name: str, data: bytes, samples: int, info: CacheInfo, skipped: list[Skipped],
                options: fs.StorageOptions | None = None) -> ShardInfo:
    """The shard first, its fragment last: a fragment always describes a complete shard."""
    shard = ShardInfo(name=name, samples=samples, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    fs.write_atomic(fs.join(root, name), data, options)
    fragment = Fragment(info=info, shard=shard, skipped=skipped)
    fs.write_atomic(fragment_url(root, name), json.dumps(dataclasses.asdict(fragment)).encode(), options)
    return shard


def finished_shards(root: str, options: fs.StorageOptions | None = None) -> set[str]:
    """Names of the shards whose fragment exists."""
    fsys, path = fs.filesystem(fs.join(root, FRAGMENTS), options)
    try:
        names = fsys.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {n.rsplit("/", 1)[-1].removesuffix(".json") + ".tar" for n in names if n.endswith(".json")}


def merge_fragments(root: str, options: fs.StorageOptions | None = None) -> Manifest:
    """Merge every fragment into ``manifest.json``; all shards must be finished."""
    fsys, path = fs.filesystem(fs.join(root, FRAGMENTS), options)
    try:
        urls = sorted(n for n in fsys.ls(path, detail=False) if n.endswith(".json"))
    except FileNotFoundError:
        raise DataError(f"{root!r} has no finished shards to merge") from None
    fragments = []
    for u in urls:
        d = json.loads(fsys.cat_file(u))
        fragments.append(Fragment(CacheInfo(**d["info"]), ShardInfo(**d["shard"]),
                                  [Skipped(**s) for s in d["skipped"]]))
    info = fragments[0].info
    for f in fragments[1:]:
        if f.info != info:
            raise DataError(
                f"{root!r}: shard {f.shard.name} was encoded with other settings than "
                f"{fragments[0].shard.name}; encode into an empty directory"
            )
    if len(fragments) != info.num_shards:
        raise DataError(f"{root!r}: {len(fragments)} of {info.num_shards} shards are finished")
    shards = sorted((f.shard for f in fragments), key=lambda s: s.name)
    manifest = Manifest(
        format_version=FORMAT_VERSION, info=info, total_samples=sum(s.samples for s in shards),
        shards=shards, skipped=[s for f in fragments for s in f.skipped],
    )
    fs.write_atomic(fs.join(root, MANIFEST), manifest.to_json().encode(), options)
    return manifest


# -- reading ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    d = ast.literal_eval(header.decode("latin1"))
    if d.get("fortran_order"):
        raise ValueError("Fortran-ordered arrays are not used in latent shards")
    return np.dtype(d["descr"]), tuple(d["shape"])


def npy_array(data: bytes | memoryview) -> np.ndarray:
    """A .npy payload as a (read-only, zero-copy) array. Every sample of a shard has the same
    header, so parsing it is a cache lookup: this is ~70x faster than np.load per sample."""
    data = memoryview(data)
    if bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    if data[6] == 1:
        length, start = int.from_bytes(data[8:10], "little"), 10
    else:
        length, start = int.from_bytes(data[8:12], "little"), 12
    dtype, shape = _npy_header(bytes(data[start : start + length]))
    return np.frombuffer(data, dtype=dtype, offset=start + length, count=math.prod(shape)).reshape(shape)


def _tar_members(data: memoryview) -> Iterator[tuple[str, memoryview]]:
    """(name, payload) of the regular files of an in-memory tar (ustar, GNU long names, pax)."""
    pos, end, long_name = 0, len(data), None
    while pos + 512 <= end:
        header = data[pos : pos + 512]
        if not any(header[:100]):  # the two zero blocks that end an archive
            return
        name = bytes(header[:100]).split(b"\0", 1)[0].decode()
        prefix = bytes(header[345:500]).split(b"\0", 1)[0].decode()
        if prefix and bytes(header[257:262]) == b"ustar":
            name = f"{prefix}/{name}"
        size_field = bytes(header[124:136]).split(b"\0", 1)[0].strip()
        size = int(size_field, 8) if size_field else 0
        kind = header[156:157].tobytes()
        body = pos + 512
        if body + size > end:
            raise DataError(f"truncated tar: member {name!r} needs {size} bytes, {end - body} left")
        payload = data[body : body + size]
        pos = body + (size + 511) // 512 * 512
        if kind == b"L":  # GNU long name of the next member
            long_name = bytes(payload).split(b"\0", 1)[0].decode()
            continue
        if kind == b"x":  # pax header: the path record, if any, names the next member
            for record in bytes(payload).decode().splitlines():
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
            continue
        if kind in (b"0", b"\0"):
            yield (long_name or name), payload
        long_name = None
    raise DataError("truncated tar: no end-of-archive blocks")


VERIFY_LEVELS = ("size", "sha256", "none")


def load_shard(url: str, options: fs.StorageOptions | None = None, cache_dir: str | None = None) -> bytes | memoryview:
    """A shard's bytes: memory-mapped when local (pages are read only when a sample's array is
    used, so an unused flip variant costs no I/O), read whole otherwise."""
    if fs.is_local(url):
        path = url.removeprefix("file://")
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except OSError as e:
            raise DataError(f"cannot read shard {url!r}: {e}") from None
    try:
        with fs.open_for_read(url, options, cache_dir) as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read shard {url!r}: {e}") from None


def read_shard(source: IO[bytes] | bytes | memoryview, *, verify: ShardInfo | None = None,
               level: str = "sha256") -> list[dict[str, Any]]:
    """Every sample of a shard (a file object, or its bytes) as {"__key__": key, "latent.npy":
    payload, ...}, in order. With ``verify``, the shard is checked against its manifest entry
    before any sample is used: ``level`` "size" (bytes and sample count), "sha256" (and the
    hash), or "none". A mismatch or a corrupt tar raises DataError."""
    if isinstance(source, (bytes, memoryview)):
        data = source
    else:
        try:
            data = source.read()
        except OSError as e:
            raise DataError(f"cannot read shard: {e}") from None
    if level == "none":
        verify = None
    if verify is not None:
        if len(data) != verify.bytes:
            raise DataError(f"shard {verify.name} has {len(data)} bytes, the manifest says {verify.bytes}")
        if level == "sha256" and hashlib.sha256(data).hexdigest() != verify.sha256:
            raise DataError(f"shard {verify.name} does not match its manifest sha256")
    samples: list[dict[str, Any]] = []
    for name, payload in _tar_members(memoryview(data)):
        key, _, ext = name.rpartition("/")[2].partition(".")
        key = name[: len(name) - len(ext) - 1] if ext else name
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        samples[-1][ext] = payload
    if verify is not None and len(samples) != verify.samples:
        raise DataError(f"shard {verify.name} has {len(samples)} samples, the manifest says {verify.samples}")
    return samples


def iter_shard(f: IO[bytes], *, verify: ShardInfo | None = None) -> Iterator[dict[str, Any]]:
    """:func:`read_shard` (full verification), one sample at a time."""
    yield from read_shard(f, verify=verify)


def decode_sample(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(latent, latent_flip or None, label) of a raw sample."""
    try:
        flip = sample.get("latent_flip.npy")
        return npy_array(sample["latent.npy"]), None if flip is None else npy_array(flip), int(bytes(sample["cls"]))
    except (KeyError, ValueError, SyntaxError) as e:
        raise DataError(f"sample {sample.get('__key__')!r} is malformed: {e}") from None
