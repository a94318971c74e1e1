"""Encode images into a latent cache: ``python -m dis_dist.data.encode`` (``tools/encode_latents.py``).

    python tools/encode_latents.py --input /data/imagenet/train --output s3://bucket/in256-sdvae \\
        --vae stabilityai/sd-vae-ft-ema --resolution 256
    python tools/encode_latents.py --input /usr/share/datasets/fashion-mnist --output runs/data/fmnist \\
        --vae pixels --resolution 32

The input is cut into shards deterministically; each worker (``--rank/--world-size``, torchrun
or a SLURM array) encodes only its own, skipping those already finished, so a killed encode
resumes where it stopped. The worker that sees every shard finished (or ``--finalize``) writes
``manifest.json``. See :mod:`dis_dist.data.manifest` and :mod:`dis_dist.data.tar` for the format.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dis_dist.data import fs
from dis_dist.data.encoders import build_encoder
from dis_dist.data.manifest import (
    FORMAT_VERSION,
    LATENT_KINDS,
    CacheInfo,
    Manifest,
    Skipped,
    finished_shards,
    merge_fragments,
    shard_name,
    skip_summary,
    write_shard,
)
from dis_dist.data.sources import Item, Source, center_crop, open_source, pad_array, pad_to
from dis_dist.data.tar import build_shard
from dis_dist.distributed.env import resolve_device, worker_from_env
from dis_dist.errors import DataError
from dis_dist.utils.cli import cli_main, setup_logging

log = logging.getLogger("dis_dist.encode")


@dataclass
class EncodeResult:
    encoded: list[str]  # shards written by this call
    skipped_existing: list[str]  # this worker's shards that were already finished
    manifest: Manifest | None  # set when this call wrote manifest.json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dis_dist.data.encode", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", required=True, help="ImageFolder tree, image .tar shards, or Fashion-MNIST IDX dir")
    p.add_argument("--output", required=True, help="directory URL of the cache (local path or s3://...)")
    p.add_argument("--input-format", default="auto", choices=["auto", "folder", "shards", "fmnist"])
    p.add_argument("--split", default="train", help="Fashion-MNIST split")
    p.add_argument("--num-classes", type=int, help="for shard inputs (default: from the first shard)")
    p.add_argument("--vae", default="pixels", help="'pixels', or an AutoencoderKL hub id / local directory")
    p.add_argument("--vae-revision", help="hub revision of the VAE")
    p.add_argument("--latent-kind", default="moments", choices=[k for k in LATENT_KINDS if k != "pixels"])
    p.add_argument("--resolution", type=int, default=256, help="image size after preprocessing")
    p.add_argument("--preprocess", default="auto", choices=["auto", "center-crop", "pad"],
                   help="ADM centre crop, or padding of smaller images (auto: pad for Fashion-MNIST)")
    p.add_argument("--no-flip", action="store_true", help="do not store the flipped image's latent")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="shuffles folder inputs before sharding")
    p.add_argument("--max-file-mb", type=float, default=fs.MAX_INPUT_MB,
                   help="larger image files are skipped (and counted) unread")
    p.add_argument("--rank", type=int, help="this worker (default: torchrun/SLURM, else 0)")
    p.add_argument("--world-size", type=int, help="number of workers")
    p.add_argument("--finalize", action="store_true", help="only merge finished shards into manifest.json")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="VAE autocast (auto: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.max_file_mb < float("inf"):
        p.error(f"--max-file-mb {args.max_file_mb}: must be a positive number")
    return args


def _preprocess(item: Item, how: str, size: int, mode: str, source_mode: str) -> np.ndarray:
    """The item's image, preprocessed, as a uint8 array (H, W) or (H, W, C). An image the source
    holds as an array in the wanted mode is padded without PIL (the same pixels, much faster)."""
    if item.array is not None and how == "pad" and mode == source_mode:
        return pad_array(item.array(), size)
    image = item.load().convert(mode)
    return np.asarray(center_crop(image, size) if how == "center-crop" else pad_to(image, size))


def _encode_unit(items, args, encoder, preprocess: str, mode: str, source_mode: str,  # noqa: ANN001, ANN202
                 generator: torch.Generator, progress):  # noqa: ANN001
    """Encode one shard's items: (samples, skipped inputs)."""
    samples, skipped, batch = [], [], []

    def flush() -> None:
        images = np.stack([im for _, im in batch])
        latents = encoder.encode_uint8(images, generator)
        flips = None if args.no_flip else encoder.encode_uint8(images[:, :, ::-1], generator)
        for k, (item, _) in enumerate(batch):
            samples.append({"key": item.key, "cls": item.label, "latent": latents[k],
                            "latent_flip": None if flips is None else flips[k]})
        progress.update(len(batch))
        batch.clear()

    for item in items:
        try:
            if item.label < 0:
                raise fs.UnusableInput(item.origin, "no image or no label")
            batch.append((item, _preprocess(item, preprocess, args.resolution, mode, source_mode)))
        except DataError as e:  # one input: skipped and counted by its reason, the run goes on
            why = e.why if isinstance(e, fs.UnusableInput) else "unusable image"
            skipped.append(Skipped(key=item.key, source=item.origin, reason=str(e), why=why))
            log.warning("skipped %s", e)
            continue
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    return samples, skipped


def encode(args: argparse.Namespace) -> EncodeResult:
    """Encode this worker's shards of ``args.input`` into ``args.output``."""
    options = {"endpoint_url": args.s3_endpoint} if args.s3_endpoint else None
    out = args.output.rstrip("/")
    fs.check_access(out, options, must_exist=False)
    fs.check_writable(out, options, fix="choose another --output")
    if args.finalize:
        manifest = merge_fragments(out, options)
        log.info("wrote %s: %d samples in %d shards", fs.join(out, "manifest.json"),
                 manifest.total_samples, len(manifest.shards))
        return EncodeResult([], [], manifest)
    rank, world = (args.rank, args.world_size) if args.rank is not None else worker_from_env()
    if args.world_size is not None:
        world = args.world_size
    if not 0 <= rank < world:
        raise DataError(f"--rank {rank} is not in [0, {world})")
    source: Source = open_source(args.input, args.input_format, shard_size=args.shard_size, seed=args.seed,
                                 split=args.split, num_classes=args.num_classes, options=options,
                                 max_bytes=int(args.max_file_mb * 2**20))
    preprocess = source.preprocess if args.preprocess == "auto" else args.preprocess
    device = resolve_device(args.device)
    encoder = build_encoder(args.vae, args.vae_revision, args.latent_kind, device, args.precision)
    settings = {k: getattr(args, k) for k in ("input", "input_format", "split", "resolution", "shard_size",
                                              "batch_size", "seed", "no_flip", "precision")}
    settings["preprocess"] = preprocess
    num = len(source.units)
    mine = [i for i in range(num) if i % world == rank]
    done = finished_shards(out, options)
    todo = [i for i in mine if shard_name(i) not in done]
    result = EncodeResult([], [shard_name(i) for i in mine if shard_name(i) in done], None)
    log.info("worker %d/%d: %d of %d shards to encode (%d already finished) into %s",
             rank, world, len(todo), len(mine), len(result.skipped_existing), out)
    mode = encoder.image_mode or source.mode
    probe = encoder.encode_uint8(np.asarray(Image.new(mode, (args.resolution, args.resolution)))[None])
    info = CacheInfo(
        vae=encoder.name, vae_revision=encoder.revision, scaling_factor=encoder.scaling_factor,
        resolution=args.resolution, latent_shape=list(probe.shape[1:]), latent_dtype="float16",
        latent_kind=encoder.latent_kind, class_names=source.class_names, has_flip=not args.no_flip,
        num_shards=num, encode=settings,
    )
    total = sum(source.sizes[i] for i in todo) if source.sizes else None
    encoded, skipped_here = 0, []
    with tqdm(desc=f"encode {rank}/{world}", total=total, unit="img", disable=args.no_progress,
              dynamic_ncols=True) as bar:
        for i in todo:
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
            samples, skipped = _encode_unit(source.units[i](), args, encoder, preprocess, mode, source.mode,
                                            generator, bar)
            try:
                write_shard(out, shard_name(i), build_shard(samples), len(samples), info, skipped, options)
            except DataError as e:  # a full disk: the shards written so far stay finished
                raise DataError(f"{e} (the {len(result.encoded)} shards finished before are kept: "
                                f"a rerun resumes after them)") from None
            result.encoded.append(shard_name(i))
            encoded, skipped_here = encoded + len(samples), skipped_here + skipped
    if todo:
        log.info("worker %d/%d: %d images encoded, %s", rank, world, encoded, skip_summary(skipped_here))
    if len(finished_shards(out, options)) == num:
        result.manifest = merge_fragments(out, options)
        log.info("all %d shards finished: wrote %s (%d samples, %s)", num, fs.join(out, "manifest.json"),
                 result.manifest.total_samples, skip_summary(result.manifest.skipped))
    return result


@cli_main
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    encode(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["FORMAT_VERSION", "EncodeResult", "encode", "main", "parse_args"]
