"""Image -> stored latent: the identity for pixel-space caches, or a diffusers AutoencoderKL."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor

from dis_dist.errors import DataError


def arrays_to_tensor(arrays: np.ndarray) -> Tensor:
    """uint8 images (n, H, W) or (n, H, W, C) -> float (n, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(arrays, order="C"))  # a copy: the arrays may be read-only views
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.float().div_(127.5).sub_(1.0)


class PixelEncoder:
    """The image itself in [-1, 1] (the paper's CIFAR-10/CelebA pixel-space setting)."""

    name = "pixels"
    revision = None
    scaling_factor = 1.0
    latent_kind = "pixels"
    image_mode = None  # keep the source's mode: Fashion-MNIST stays one channel

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x.to(torch.float16)

    @staticmethod
    @functools.cache
    def _table() -> np.ndarray:
        """The stored value of each of the 256 pixel values: :meth:`encode` of :func:`arrays_to_tensor`
        itself, so a lookup gives the same bits as the tensor path."""
        levels = np.arange(256, dtype=np.uint8)[None, None]
        return PixelEncoder().encode(arrays_to_tensor(levels)).numpy().reshape(256)

    def encode_uint8(self, images: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
        """uint8 images (n, H, W) or (n, H, W, C) -> float16 (n, C, H, W): a table lookup, no float
        arithmetic (the same values as ``encode(arrays_to_tensor(images))``, about 20x faster)."""
        x = self._table()[images]
        return x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class VAEEncoder:
    """A diffusers AutoencoderKL from a hub id or a local directory (works offline from a local copy).

    ``kind``: "moments" stores the posterior mean and std (times the scaling factor) stacked on
    the channel axis; "sample" one draw; "mean" the mean.
    """

    image_mode = "RGB"

    def __init__(self, name: str, revision: str | None, kind: str, device: torch.device, precision: str) -> None:
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise DataError("VAE encoding needs diffusers: pip install diffusers") from None
        try:
            self.vae = AutoencoderKL.from_pretrained(name, revision=revision).to(device).eval()
        except Exception as e:  # OSError for a missing repo/dir, plus hub and config errors
            raise DataError(
                f"cannot load the VAE {name!r}: {type(e).__name__}: {e}. Give a local directory "
                f"holding config.json and the weights, or a hub id reachable from here"
            ) from None
        self.name, self.revision, self.latent_kind, self.device = name, revision, kind, device
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        if precision == "auto":
            precision = "fp16" if device.type == "cuda" else "fp32"
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]

    @torch.inference_mode()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = x.to(self.device)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else nullcontext())
        with ctx:
            posterior = self.vae.encode(x).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        if self.latent_kind == "moments":
            out = torch.cat([mean, std], dim=1)
        elif self.latent_kind == "sample":
            noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else "cpu")
            out = mean + std * noise.to(mean.device)
        else:
            out = mean
        return (out * self.scaling_factor).to(torch.float16).cpu()

    def encode_uint8(self, images: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
        """uint8 images (n, H, W, 3) -> float16 latents (n, C, h, w) as an array."""
        return self.encode(arrays_to_tensor(images), generator).numpy()


def build_encoder(vae: str, revision: str | None, kind: str, device: torch.device, precision: str):  # noqa: ANN201
    """``vae="pixels"`` for pixel-space caches, else an AutoencoderKL id or directory."""
    if vae == "pixels":
        return PixelEncoder()
    return VAEEncoder(vae, revision, kind, device, precision)


def latent_decoder(vae: str, scaling_factor: float, device: torch.device) -> Callable[[Tensor], Tensor]:
    """latents -> images in [-1, 1]: the identity for pixel caches, else the VAE's decoder (an
    AutoencoderKL hub id or local directory; DataError when it cannot be loaded here)."""
    if vae == "pixels":
        return lambda z: z
    try:
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(vae).to(device).eval()
    except Exception as e:  # no diffusers, no weights offline
        raise DataError(
            f"cannot load the VAE {vae!r} to decode latents ({type(e).__name__}: {e}); install diffusers "
            f"and give a local directory holding its config.json and weights, or a hub id reachable from here"
        ) from None

    @torch.inference_mode()
    def decode(z: Tensor) -> Tensor:
        return model.decode(z.to(device, next(model.parameters()).dtype) / scaling_factor).sample.float()

    return decode


def display_decoder(vae: str, scaling_factor: float, device: torch.device) -> Callable[[Tensor], Tensor]:
    """:func:`latent_decoder` for sample grids: when the VAE cannot be loaded here, the first
    latent channels rescaled, with one warning, so grids still show something."""
    try:
        return latent_decoder(vae, scaling_factor, device)
    except DataError as e:
        import logging

        logging.getLogger(__name__).warning("%s; sample grids show raw latent channels", e)

    def raw(z: Tensor) -> Tensor:
        z = z[:, :3]
        low, high = z.amin(dim=(1, 2, 3), keepdim=True), z.amax(dim=(1, 2, 3), keepdim=True)
        return (z - low) / (high - low + 1e-6) * 2 - 1

    return raw
