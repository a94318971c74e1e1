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

import dataclasses
import hashlib
import io
import json
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

class _HashingReader:
    """A read-only file wrapper that hashes what passes through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha = f, hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data


def iter_shard(f: IO[bytes], *, verify: ShardInfo | None = None) -> Iterator[dict[str, bytes]]:
    """Samples of a shard as {"__key__": key, "latent.npy": bytes, ...}, in order. With
    ``verify``, checks the sample count, the bytes and their sha256 at the end; a mismatch or a
    truncated/corrupt tar raises DataError (after yielding what was readable)."""
    reader = _HashingReader(f)
    current: dict[str, Any] | None = None
    count = 0
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        count += 1
                        yield current
                    current = {"__key__": key}
                current[ext] = data
        while reader.read(1 << 16):  # the tar's end padding, for the hash
            pass
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"corrupt or truncated shard: {type(e).__name__}: {e}") from None
    if current is not None:
        count += 1
        yield current
    if verify is not None:
        if count != verify.samples:
            raise DataError(f"shard {verify.name} has {count} samples, the manifest says {verify.samples}")
        if reader.count != verify.bytes or reader.sha.hexdigest() != verify.sha256:
            raise DataError(f"shard {verify.name} does not match its manifest sha256/size")


def decode_sample(sample: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(latent, latent_flip or None, label) of a raw sample."""
    try:
        latent = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
        flip = sample.get("latent_flip.npy")
        flip = None if flip is None else np.load(io.BytesIO(flip), allow_pickle=False)
        return latent, flip, int(sample["cls"])
    except (KeyError, ValueError) as e:
        raise DataError(f"sample {sample.get('__key__')!r} is malformed: {e}") from None
