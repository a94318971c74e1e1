"""The dataset interface the trainer sees, and an in-memory implementation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ImageDataset:
    """Images held in memory as uint8 (n, C, H, W) with integer labels.

    Batches come out as float in [-1, 1] (pixel space). The latent-cache pipeline provides
    its own dataset with the same ``batch``/``num_classes``/``channels`` surface.
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(x float32 in [-1, 1], labels) of the given sample indices."""
        x = self.images[indices].float().div_(127.5).sub_(1.0)
        return x, self.labels[indices]
