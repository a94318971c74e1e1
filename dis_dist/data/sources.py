"""Image sources for the encoder: an ImageFolder tree, image webdataset shards, Fashion-MNIST.

A source is a list of *units* (the encoder's future output shards), each a list of items that
load their image lazily. The partition is a pure function of the input (and a seed), so every
worker computes the same one and takes its own units.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from dis_dist.data import fs
from dis_dist.data.inputs import NPZ_KINDS, url_kind
from dis_dist.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")


@dataclass
class Item:
    key: str
    label: int
    origin: str  # where it came from, for the manifest's record of skipped inputs
    load: Callable[[], Image.Image]
    # The image as a uint8 array (H, W) or (H, W, C) in the source's mode, without PIL, where the
    # source holds it so (Fashion-MNIST): what np.asarray(load()) gives.
    array: Callable[[], np.ndarray] | None = None


@dataclass
class Source:
    kind: str
    class_names: list[str]
    units: list[Callable[[], Iterator[Item]]]  # one per output shard
    preprocess: str  # "center-crop" (ADM/DiT) or "pad" (images already at size, padded)
    mode: str = "RGB"  # every image is converted to this PIL mode ("L" keeps one channel)
    sizes: list[int] | None = None  # items per unit, when known without reading the input


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM/DiT preprocessing: halve with BOX while the short side is at least 2x the target,
    then BICUBIC to the target short side, then the central size x size crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def pad_to(image: Image.Image, size: int) -> Image.Image:
    """Centre an image smaller than size x size on a black canvas."""
    if image.width > size or image.height > size:
        raise DataError(f"a {image.width}x{image.height} image does not fit in {size}x{size}; use center-crop")
    canvas = Image.new(image.mode, (size, size))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def pad_array(image: np.ndarray, size: int) -> np.ndarray:
    """:func:`pad_to` of a uint8 (H, W) or (H, W, C) array: the same pixels, without PIL."""
    height, width = image.shape[:2]
    if width > size or height > size:
        raise DataError(f"a {width}x{height} image does not fit in {size}x{size}; use center-crop")
    if height == width == size:
        return image
    canvas = np.zeros((size, size, *image.shape[2:]), dtype=image.dtype)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


def _decode_image(data: bytes, origin: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as e:  # PIL raises many types for corrupt data
        raise fs.UnusableInput(origin, "unreadable image", f"{type(e).__name__}: {e}") from None


def _unusable_item(path: str, error: DataError) -> Item:
    """The stand-in for an input that cannot be read at all (a .tar shard that is a FIFO, or
    corrupt): loading it raises ``error``, so the encoder skips and counts it like a bad image."""
    def load() -> Image.Image:
        raise error

    return Item(key=PurePosixPath(path).name, label=0, origin=path, load=load)


def _chunks(items: list[Item], size: int) -> list[Callable[[], Iterator[Item]]]:
    return [lambda part=items[i : i + size]: iter(part) for i in range(0, len(items), size)]


def _chunk_sizes(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def image_folder(url: str, shard_size: int, seed: int, options: fs.StorageOptions | None = None,
                 max_bytes: int | None = fs.MAX_INPUT_MB * 2**20) -> Source:
    """Class sub-folders (sorted: the class index), image files in them (ImageNet's layout).
    Items are shuffled with ``seed`` before sharding so that shards mix classes. Links to
    sub-folders are not followed (no loops); each file is read only if :func:`fs.open_input`
    allows it (regular, at most ``max_bytes``)."""
    fsys, root = fs.filesystem(url, options)
    classes = sorted(PurePosixPath(p).name for p in fsys.ls(root, detail=False) if fsys.isdir(p))
    if not classes:
        raise DataError(f"{url!r} has no class sub-folders (expected root/<class>/<image>)")
    items: list[Item] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in fsys.find(f"{root.rstrip('/')}/{name}") if p.endswith(IMAGE_EXTENSIONS))
        for path in files:
            items.append(Item(
                key="", label=label, origin=path,
                load=lambda p=path: _decode_image(fs.read_input(fsys, p, max_bytes), p),
            ))
    random.Random(seed).shuffle(items)
    for index, item in enumerate(items):
        item.key = f"{index:09d}"
    return Source("folder", classes, _chunks(items, shard_size), "center-crop",
                  sizes=_chunk_sizes(len(items), shard_size))


def image_shards(url: str, num_classes: int | None, options: fs.StorageOptions | None = None) -> Source:
    """Image webdataset shards (``*.tar`` under ``url``, or one ``.tar``): jpg/png/webp + cls.
    Each input shard becomes one output shard; one that cannot be read (not a regular file, or
    corrupt) is one skipped input. Without ``num_classes`` the first readable shard's labels
    tell it (max label + 1)."""
    from dis_dist.data.shards import read_shard

    fsys, root = fs.filesystem(url, options)
    paths = [root] if root.endswith(".tar") else sorted(p for p in fsys.find(root) if p.endswith(".tar"))
    if not paths:
        raise DataError(f"no .tar shards under {url!r}")

    def read(path: str) -> list[dict]:
        with fs.open_input(fsys, path) as f:
            return read_shard(f)

    def unit(path: str) -> Iterator[Item]:
        try:
            samples = read(path)
        except DataError as e:
            yield _unusable_item(path, e)
            return
        for sample in samples:
            key, origin = sample["__key__"], f"{path}:{sample['__key__']}"
            ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
            data = sample[ext] if ext else b""
            label = int(bytes(sample["cls"])) if "cls" in sample else -1
            yield Item(key=key.replace("/", "_"), label=label, origin=origin,
                       load=lambda d=data, o=origin: _decode_image(d, o))

    if num_classes is None:
        for path in paths:
            with contextlib.suppress(DataError):
                samples = read(path)
                num_classes = 1 + max((int(bytes(s["cls"])) for s in samples if "cls" in s), default=-1)
                break
        else:
            raise DataError(f"no readable .tar shard under {url!r} to count the classes in; pass --num-classes")
    return Source("shards", [str(i) for i in range(num_classes)], [lambda p=p: unit(p) for p in paths],
                  "center-crop")


def fashion_mnist(url: str, split: str, shard_size: int) -> Source:
    """Fashion-MNIST's IDX files; images stay 28x28 grayscale (padded by the encoder)."""
    from dis_dist.data.fmnist import CLASS_NAMES, load_fmnist

    data = load_fmnist(url, split, image_size=28)
    images, labels = data.images[:, 0].numpy(), data.labels.tolist()
    items = [
        Item(key=f"{i:09d}", label=labels[i], origin=f"{url}:{split}[{i}]",
             load=lambda i=i: Image.fromarray(images[i], mode="L"), array=lambda i=i: images[i])
        for i in range(len(labels))
    ]
    return Source("fmnist", list(CLASS_NAMES), _chunks(items, shard_size), "pad", mode="L",
                  sizes=_chunk_sizes(len(items), shard_size))


def open_source(url: str, kind: str, *, shard_size: int, seed: int, split: str = "train",
                num_classes: int | None = None, options: fs.StorageOptions | None = None,
                max_bytes: int | None = fs.MAX_INPUT_MB * 2**20) -> Source:
    """Open the source at ``url``; ``kind`` "auto" asks :func:`~dis_dist.data.inputs.url_kind`
    whether it is Fashion-MNIST, shards or a folder. ``max_bytes`` caps one image file of a folder."""
    fs.check_access(url, options)
    if kind == "auto":
        kind = url_kind(url, options)
        if kind in NPZ_KINDS:  # not an input the encoder reads: as a folder, opening it says what is missing
            kind = "folder"
    if kind == "fmnist":
        if not fs.is_local(url):
            raise DataError("Fashion-MNIST IDX input must be a local directory")
        return fashion_mnist(url, split, shard_size)
    if kind == "shards":
        return image_shards(url, num_classes, options)
    if kind == "folder":
        return image_folder(url, shard_size, seed, options, max_bytes)
    raise DataError(f"unknown input format {kind!r}; choose one of: auto, folder, shards, fmnist")
