"""The ``manifest.json`` of a latent cache and the fragments it is merged from.

The manifest says what every shard of a cache shares (:class:`CacheInfo`) and lists the shards
(name, samples, bytes, sha256) and the inputs left out. What a latent holds is its
``latent_kind``: ``moments`` (the posterior mean and std stacked on the channel axis, both
already multiplied by the VAE's scaling factor, so a reader draws mean + std * eps), ``sample``,
``mean``, or ``pixels`` (the image itself in [-1, 1]).

While encoding, every finished shard gets a fragment ``_fragments/<shard>.json`` (written after
the shard, so a fragment means a complete shard); ``manifest.json`` merges the fragments.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from dis_dist.data import fs
from dis_dist.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FRAGMENTS = "_fragments"
LATENT_KINDS = ("moments", "sample", "mean", "pixels")
LATENT_DTYPES = ("float16", "float32")


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
    reason: str  # the whole message: the input, what is wrong, details
    why: str = ""  # the reason in a few words, what skips are counted by ("" in older manifests)


def skip_summary(skipped: list[Skipped]) -> str:
    """Count the skips by reason in words: '3 inputs skipped: 2 broken symlink, 1 unreadable
    image' (the most frequent reason first)."""
    counts = collections.Counter(s.why or "other" for s in skipped)
    text = f"{len(skipped)} input{'' if len(skipped) == 1 else 's'} skipped"
    reasons = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return text + (": " + ", ".join(f"{n} {why}" for why, n in reasons) if reasons else "")


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
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{url} is not a valid manifest: {e}") from None
        if isinstance(d, dict) and d.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{url}: format version {d.get('format_version')!r}, this code reads {FORMAT_VERSION}")
        manifest = _parse(cls, d, f"{url} is not a valid manifest")
        manifest.check(url)
        return manifest

    def check(self, url: str) -> None:
        """Check the values a reader relies on; raise DataError naming the first one that is wrong."""
        info = self.info

        def fail(what: str) -> None:
            raise DataError(f"{url} is not a valid manifest: {what}")

        if info.latent_kind not in LATENT_KINDS:
            fail(f"latent_kind {info.latent_kind!r} is not one of {', '.join(LATENT_KINDS)}")
        if len(info.latent_shape) != 3 or min(info.latent_shape) < 1 or max(info.latent_shape) > 2**20:
            fail(f"latent_shape {info.latent_shape} is not (channels, height, width)")
        if info.latent_kind == "moments" and info.latent_shape[0] % 2:
            fail(f"latent_shape {info.latent_shape}: moments need an even number of channels (mean, std)")
        if info.latent_dtype not in LATENT_DTYPES:
            fail(f"latent_dtype {info.latent_dtype!r} is not one of {', '.join(LATENT_DTYPES)}")
        if not (math.isfinite(info.scaling_factor) and info.scaling_factor > 0):
            fail(f"scaling_factor {info.scaling_factor} is not a positive number")
        if not self.shards:
            fail("it lists no shards")
        for shard in self.shards:
            if not _SHARD_FILE.match(shard.name):
                fail(f"shard name {shard.name!r} is not a plain .tar file name")
            if shard.samples < 1 or shard.bytes < 0:
                fail(f"shard {shard.name} has {shard.samples} samples and {shard.bytes} bytes")
        if len({s.name for s in self.shards}) != len(self.shards):
            fail("a shard is listed twice")
        samples = sum(s.samples for s in self.shards)
        if info.num_shards != len(self.shards) or self.total_samples != samples:
            fail(f"info.num_shards={info.num_shards} and total_samples={self.total_samples} do not match "
                 f"its {len(self.shards)} shards of {samples} samples")


_SHARD_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar$")


def _parse(cls: type, data: Any, what: str, where: str = "") -> Any:
    """Build a dataclass of this module from JSON data, every field checked for its declared type."""
    if not isinstance(data, dict):
        raise DataError(f"{what}: {where or 'the top level'} is a {type(data).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DataError(f"{what}: {key} is missing")
            continue
        kwargs[name] = _typed(data[name], hints[name], what, key)
    return cls(**kwargs)


def _typed(value: Any, hint: Any, what: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _parse(hint, value, what, key)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            raise DataError(f"{what}: {key} is {value!r}, not a list")
        return [_typed(v, args[0], what, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DataError(f"{what}: {key} is {value!r}, not an object")
        return value
    if args and type(None) in args:  # X | None
        return None if value is None else _typed(value, next(a for a in args if a is not type(None)), what, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise DataError(f"{what}: {key} is {value!r}, not a {hint.__name__}")


@dataclass
class Fragment:
    """A fragment records one finished shard: the cache's settings, the shard, its skipped inputs."""

    info: CacheInfo
    shard: ShardInfo
    skipped: list[Skipped]


def shard_name(index: int) -> str:
    """Name shard ``index`` as the encoder does: ``shard-000042.tar``."""
    return f"shard-{index:06d}.tar"


def fragment_url(root: str, shard: str) -> str:
    """Give the URL of a shard's fragment: ``<root>/_fragments/<shard without .tar>.json``."""
    return fs.join(root, FRAGMENTS, shard.removesuffix(".tar") + ".json")


def load_manifest(url: str, options: fs.StorageOptions | None = None) -> Manifest:
    """Read and check the manifest of the cache at ``url`` (a directory URL, or the manifest's
    own URL)."""
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


# -- fragments: the encoder's record of finished shards, merged into the manifest --------------

def write_shard(root: str, name: str, data: bytes, samples: int, info: CacheInfo, skipped: list[Skipped],
                options: fs.StorageOptions | None = None) -> ShardInfo:
    """Write the shard first, its fragment last: a fragment always describes a complete shard."""
    shard = ShardInfo(name=name, samples=samples, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    fs.write_atomic(fs.join(root, name), data, options)
    fragment = Fragment(info=info, shard=shard, skipped=skipped)
    fs.write_atomic(fragment_url(root, name), json.dumps(dataclasses.asdict(fragment)).encode(), options)
    return shard


def finished_shards(root: str, options: fs.StorageOptions | None = None) -> set[str]:
    """Return the names of the shards whose fragment exists."""
    fsys, path = fs.filesystem(fs.join(root, FRAGMENTS), options)
    try:
        names = fsys.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {n.rsplit("/", 1)[-1].removesuffix(".json") + ".tar" for n in names if n.endswith(".json")}


def merge_fragments(root: str, options: fs.StorageOptions | None = None) -> Manifest:
    """Merge every fragment into ``manifest.json``; all shards must be finished. A shard left
    empty (all its inputs skipped) is not listed."""
    fsys, path = fs.filesystem(fs.join(root, FRAGMENTS), options)
    try:
        urls = sorted(n for n in fsys.ls(path, detail=False) if n.endswith(".json"))
    except FileNotFoundError:
        raise DataError(f"{root!r} has no finished shards to merge") from None
    fragments = []
    for u in urls:
        try:
            d = json.loads(fsys.cat_file(u))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"fragment {u} is not valid JSON ({e}): delete it to re-encode its shard") from None
        fragments.append(_parse(Fragment, d, f"fragment {u} is not valid (delete it to re-encode its shard)"))
    info = fragments[0].info
    for f in fragments[1:]:
        if f.info != info:
            raise DataError(
                f"{root!r}: shard {f.shard.name} was encoded with other settings than "
                f"{fragments[0].shard.name}; encode into an empty directory"
            )
    if len(fragments) != info.num_shards:
        raise DataError(f"{root!r}: {len(fragments)} of {info.num_shards} shards are finished")
    shards = sorted((f.shard for f in fragments if f.shard.samples), key=lambda s: s.name)
    skipped = [s for f in fragments for s in f.skipped]
    if not shards:
        raise DataError(f"{root!r}: no input could be encoded ({skip_summary(skipped)}; see the fragments "
                        f"in {fs.join(root, FRAGMENTS)})")
    manifest = Manifest(
        format_version=FORMAT_VERSION, info=dataclasses.replace(info, num_shards=len(shards)),
        total_samples=sum(s.samples for s in shards), shards=shards, skipped=skipped,
    )
    fs.write_atomic(fs.join(root, MANIFEST), manifest.to_json().encode(), options)
    return manifest
