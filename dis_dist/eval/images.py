"""Sets of uint8 images to evaluate, read in batches: an ADM ``.npz`` (``arr_0``, labels in
``arr_1``), Fashion-MNIST's IDX directory (its test split, padded to 32 like the demo's data),
or an image folder / image shards (center-cropped to a resolution, as ADM prepares ImageNet)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dis_dist.errors import DataError
from dis_dist.utils.npz import iter_npz, npz_header, npz_keys

if TYPE_CHECKING:
    from dis_dist.data.inputs import UrlKind


@dataclass
class ImageSet:
    """``count`` images (None: not known before reading them), ``batches(size)`` yields uint8
    (n, H, W, C) arrays; labels when known."""

    description: str
    count: int | None
    batches: Callable[[int], Iterator[np.ndarray]]
    labels: np.ndarray | None = None


def _npz(path: str, limit: int | None) -> ImageSet:
    keys = npz_keys(path)
    if "arr_0" not in keys:
        raise DataError(f"{path!r} has no arr_0 (images); it holds: {', '.join(keys) or 'nothing'}")
    shape, dtype = npz_header(path, "arr_0")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        hint = "; floats in [0, 1]? write (x * 255).round().astype(np.uint8)" if dtype.kind == "f" else ""
        raise DataError(f"{path!r}: arr_0 is {dtype} of shape {shape}, expected uint8 images N x H x W x 3 "
                        f"(values 0-255{hint})")
    count = min(shape[0], limit or shape[0])
    if count < 2:
        of = f" (--limit {limit} of {shape[0]})" if count < shape[0] else ""
        raise DataError(f"{path!r} holds {count} image{'' if count == 1 else 's'}{of}: the metrics need at least 2")
    labels = None
    if "arr_1" in keys:
        lshape, ldtype = npz_header(path, "arr_1")
        if ldtype.kind not in "iu" or lshape != shape[:1]:
            held = f"{lshape[0]} labels" if len(lshape) == 1 else "labels"
            raise DataError(f"{path!r}: arr_1 holds {held} of dtype {ldtype} and shape {lshape} for {shape[0]} "
                            f"images in arr_0: expected one integer class label per image")
        with np.load(path) as z:
            labels = z["arr_1"][:count].astype(np.int64)

    def batches(size: int) -> Iterator[np.ndarray]:
        seen = 0
        for batch in iter_npz(path, "arr_0", size):
            if seen >= count:
                return
            yield batch[: count - seen]
            seen += len(batch)

    return ImageSet(f"{path} ({count} images of {shape[1]}x{shape[2]})", count, batches, labels)


def _in_memory(description: str, images: np.ndarray, labels: np.ndarray | None) -> ImageSet:
    def batches(size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(images), size):
            yield images[start : start + size]

    return ImageSet(description, len(images), batches, labels)


def open_images(url: str, *, resolution: int | None = None, limit: int | None = None,
                kind: UrlKind | None = None) -> ImageSet:
    """Open the images at ``url`` (see the module docstring for the forms). ``kind`` is what
    :func:`~dis_dist.data.inputs.url_kind` says of ``url``, when the caller has asked it already."""
    from dis_dist.data.inputs import NPZ_KINDS, url_kind
    from dis_dist.data.sources import center_crop, open_source

    kind = kind or url_kind(url)
    if kind in NPZ_KINDS:
        if not Path(url).is_file():
            raise DataError(f"{url!r} does not exist")
        return _npz(url, limit)
    if kind == "fmnist":
        from dis_dist.data.fmnist import load_fmnist

        data = load_fmnist(url, "test", 32)
        images = data.images[:limit].permute(0, 2, 3, 1).numpy()
        return _in_memory(f"Fashion-MNIST test split at {url} ({len(images)} images)", images,
                          data.labels[:limit].numpy())
    if resolution is None:
        raise DataError(f"{url!r} is an image folder or shards: give the resolution to center-crop to")
    source = open_source(url, kind, shard_size=10**9, seed=0)
    count = sum(source.sizes) if source.sizes else None
    count = min(count, limit) if count is not None and limit else count or limit

    def batches(size: int) -> Iterator[np.ndarray]:
        batch, seen = [], 0
        for unit in source.units:
            for item in unit():
                if limit and seen >= limit:
                    break
                batch.append(np.asarray(center_crop(item.load().convert("RGB"), resolution)))
                seen += 1
                if len(batch) == size:
                    yield np.stack(batch)
                    batch = []
        if batch:
            yield np.stack(batch)
        if not seen:
            raise DataError(f"no images under {url!r}")

    return ImageSet(f"{url} (center-cropped to {resolution})", count, batches)
