"""Image tensors <-> uint8 arrays, grids and PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """Images in [-1, 1], (n, C, H, W) -> uint8 (n, H, W, C) (C = 1 or 3)."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (n, H, W, C) -> one uint8 (rows*H', ncol*W', C) image, row-major, ``pad`` pixels apart."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = img
    return grid


def save_png(image: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """Write a uint8 (H, W, C) image; ``scale`` enlarges it (nearest) for viewing."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
