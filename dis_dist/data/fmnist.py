"""Fashion-MNIST from its IDX files (Debian package ``dataset-fashion-mnist``), padded to 32x32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dis_dist.data.base import ImageDataset
from dis_dist.data.idx import read_idx
from dis_dist.errors import DataError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLIT_FILES = {  # the IDX files of each split (images, labels), each plain or .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {str(root)!r}. Install the Debian package "
        f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist), or set data.root to "
        f"a directory holding the IDX files."
    )


def load_fmnist(root: str | Path = DEFAULT_ROOT, split: str = "train", image_size: int = 32) -> ImageDataset:
    """Images as uint8 (n, 1, image_size, image_size), zero-padded around the 28x28 digits."""
    if split not in SPLIT_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; choose one of: train, test")
    root = Path(root)
    images_file, labels_file = (_find(root, stem) for stem in SPLIT_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST files in {str(root)!r} disagree: images {images.shape}, labels {labels.shape}"
        )
    size = images.shape[-1]
    if image_size < size:
        raise DataError(f"data.image_size={image_size} is smaller than Fashion-MNIST's {size}x{size}")
    pad = image_size - size
    before = pad // 2
    padded = np.pad(images, ((0, 0), (before, pad - before), (before, pad - before)))
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(padded))[:, None],
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=CLASS_NAMES,
    )
