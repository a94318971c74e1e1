#!/usr/bin/env python3
"""Benchmark the data path in one run, on the same data.

Loader samples/s from local shards and from a local S3 endpoint (moto_server), with 0/2/4
DataLoader workers, against the baseline layout of the popular fast-DiT feature extractor: one
.npy file per sample read through a torch Dataset + DataLoader, and against webdataset's own
pipeline on the same shards (``WebDataset`` split by worker, shuffled, decoded, a draw from the
moments, batched: what the project's stream does, minus verification and exact resume). Then
encode images/s with ``--vae pixels`` and with a tiny randomly initialised AutoencoderKL.
Medians of ``--repeats``.

    python tools/bench_data.py                    # 8192 samples of 8x32x32 fp16 moments (+ flip)
    python tools/bench_data.py --samples 2048 --no-s3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dis_dist.data import fs  # noqa: E402
from dis_dist.data.manifest import (  # noqa: E402
    FORMAT_VERSION,
    CacheInfo,
    Manifest,
    load_manifest,
    shard_name,
    write_shard,
)
from dis_dist.data.stream import ShardStream, StreamLoader, StreamSpec  # noqa: E402
from dis_dist.data.tar import build_shard  # noqa: E402


def make_cache(url: str, samples: int, shard_size: int, shape: tuple[int, ...]) -> None:
    """A moments cache with flips, random latents, 1000 classes."""
    rng = np.random.default_rng(0)
    info = CacheInfo(vae="synthetic", vae_revision=None, scaling_factor=0.18215, resolution=256,
                     latent_shape=list(shape), latent_dtype="float16", latent_kind="moments",
                     class_names=[str(i) for i in range(1000)], has_flip=True,
                     num_shards=-(-samples // shard_size), encode={})
    shards = []
    for i, start in enumerate(range(0, samples, shard_size)):
        n = min(shard_size, samples - start)
        batch = [{"key": f"{start + k:09d}", "cls": int(rng.integers(1000)),
                  "latent": rng.standard_normal(shape).astype(np.float16),
                  "latent_flip": rng.standard_normal(shape).astype(np.float16)} for k in range(n)]
        shards.append(write_shard(url, shard_name(i), build_shard(batch), n, info, []))
    manifest = Manifest(FORMAT_VERSION, info, samples, shards)
    fs.write_atomic(fs.join(url, "manifest.json"), manifest.to_json().encode())


class PerFileDataset(Dataset):
    """fast-DiT's layout: features/<i>.npy and labels/<i>.npy, one pair per sample."""

    def __init__(self, root: Path) -> None:
        self.features = sorted((root / "features").iterdir())
        self.labels = sorted((root / "labels").iterdir())

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int):  # noqa: ANN204
        return torch.from_numpy(np.load(self.features[i])), torch.from_numpy(np.load(self.labels[i]))


def make_per_file(root: Path, samples: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    (root / "features").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(samples):
        np.save(root / "features" / f"{i}.npy", rng.standard_normal(shape).astype(np.float32))
        np.save(root / "labels" / f"{i}.npy", np.array([rng.integers(1000)]))


WDS_ROWS = {"webdataset": "webdataset pipeline", "stream": "webdataset + stream decode"}


def webdataset_loader(url: str, batch_size: int, workers: int, decode: str) -> Iterator:
    """webdataset's own pipeline over the cache's shards, doing the stream's work: shards split
    over the workers, a shuffle buffer of 1000, the flip variant picked per sample, one draw
    from the moments, batches of ``batch_size``; endless. ``decode``: "webdataset" (its
    ``.decode()``, np.load per array) or "stream" (the project's batch decoding on its raw samples:
    webdataset as the tar reader only)."""
    import webdataset as wds

    fs.register_webdataset_handler()
    manifest = load_manifest(url)
    urls = [fs.join(url, s.name) for s in manifest.shards]
    generator = torch.Generator().manual_seed(0)
    pipeline = wds.WebDataset(urls, shardshuffle=len(urls), repeat=True, empty_check=False).shuffle(1000)
    if decode == "stream":
        stream = ShardStream(manifest, StreamSpec(url=url, batch_size=batch_size))
        pipeline = pipeline.batched(batch_size, collation_fn=lambda raws: stream._batch(raws, generator))
    else:
        def collate(samples: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
            flips = (torch.rand(len(samples), generator=generator) < 0.5).tolist()
            x = torch.from_numpy(np.stack([f if flip else a for (a, f, _), flip in zip(samples, flips)])).float()
            mean, std = x.chunk(2, dim=1)
            labels = torch.tensor([c for *_, c in samples])
            return torch.addcmul(mean, std, torch.randn(mean.shape, generator=generator)), labels

        pipeline = (pipeline.decode().to_tuple("latent.npy", "latent_flip.npy", "cls")
                    .batched(batch_size, collation_fn=collate))
    return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=workers))


def rate(make_iter, batches: int, batch_size: int, repeats: int) -> float:
    """Median samples/s of taking ``batches`` batches (after one warm-up batch) from a fresh iterator."""
    runs = []
    for _ in range(repeats):
        it = make_iter()
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        runs.append(batches * batch_size / (time.perf_counter() - t0))
    return statistics.median(runs)


def encode_rate(tmp: Path, vae: str, images: int, repeats: int) -> float:
    from PIL import Image

    from dis_dist.data.encode import encode, parse_args

    folder = tmp / "images"
    if not folder.exists():
        rng = np.random.default_rng(0)
        for c in range(4):
            (folder / f"c{c}").mkdir(parents=True)
            for i in range(images // 4):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    runs = []
    for r in range(repeats):
        out = tmp / f"enc-{Path(vae).name}-{r}"
        t0 = time.perf_counter()
        encode(parse_args(["--input", str(folder), "--output", str(out), "--vae", vae, "--resolution", "32",
                           "--shard-size", "256", "--batch-size", "64", "--no-progress"]))
        runs.append(images / (time.perf_counter() - t0))
    return statistics.median(runs)


def tiny_vae(tmp: Path) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp / "tiny-vae"
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32).save_pretrained(path)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batches per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="0,2,4")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--encode-images", type=int, default=512)
    p.add_argument("--demo-images-per-sec", type=float, default=210.0,
                   help="the demo trainer's measured images/s (bench_scan.py --demo)")
    args = p.parse_args(argv)
    shape = (8, 32, 32)  # SD-VAE moments of a 256 px image: mean and std, 4 x 32 x 32 each
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_per_file(tmp / "perfile", args.samples, (4, 32, 32))
        make_cache(str(tmp / "shards"), args.samples, args.shard_size, shape)
        B = args.batch_size
        for w in workers:
            ds = PerFileDataset(tmp / "perfile")
            base = rate(lambda ds=ds, w=w: iter(DataLoader(ds, batch_size=B, shuffle=True, num_workers=w,
                                                            persistent_workers=False)),
                        args.batches, B, args.repeats)
            rows.append(("per-file .npy (fast-DiT)", "local", w, base, 1.0))
            spec = StreamSpec(url=str(tmp / "shards"), batch_size=B, num_workers=w)
            ours = rate(lambda spec=spec: StreamLoader(spec), args.batches, B, args.repeats)
            rows.append(("shard stream", "local", w, ours, ours / base))
            for decode in ("webdataset", "stream"):
                r = rate(lambda w=w, d=decode: webdataset_loader(str(tmp / "shards"), B, w, d),
                         args.batches, B, args.repeats)
                rows.append((WDS_ROWS[decode], "local", w, r, r / base))
                print(f"workers {w}: per-file {base:,.0f}/s, shards {ours:,.0f}/s, {WDS_ROWS[decode]} {r:,.0f}/s",
                      flush=True)
        if not args.no_s3:
            from tests.s3server import local_s3  # a test fixture: tools run from the repository root, on sys.path

            with local_s3("bench"):
                make_cache("s3://bench/shards", args.samples, args.shard_size, shape)
                for w in workers:
                    base = next(r[3] for r in rows if r[0].startswith("per-file") and r[2] == w)
                    spec = StreamSpec(url="s3://bench/shards", batch_size=B, num_workers=w)
                    s3 = rate(lambda spec=spec: StreamLoader(spec), args.batches, B, args.repeats)
                    rows.append(("shard stream", "s3 (moto)", w, s3, s3 / base))
                    for decode in ("webdataset", "stream"):
                        r = rate(lambda w=w, d=decode: webdataset_loader("s3://bench/shards", B, w, d),
                                 args.batches, B, args.repeats)
                        rows.append((WDS_ROWS[decode], "s3 (moto)", w, r, r / base))
                        print(f"workers {w}: s3 shards {s3:,.0f}/s, {WDS_ROWS[decode]} {r:,.0f}/s", flush=True)
        enc_px = encode_rate(tmp, "pixels", args.encode_images, args.repeats)
        enc_vae = encode_rate(tmp, tiny_vae(tmp), args.encode_images, args.repeats)

    print(f"\n{args.samples} samples of {shape} fp16 moments + flip per shard sample "
          f"(per-file baseline: 4x32x32 fp32 features), batch {args.batch_size}, median of {args.repeats}")
    header = (f"{'loader':<30} {'from':<10} {'workers':>7} {'samples/s':>10} {'x per-file':>10} "
              f"{'stream/this':>11} {'x demo':>7}")
    print(header)
    print("-" * len(header))
    for name, where, w, r, ratio in rows:
        stream = next(x[3] for x in rows if x[0] == "shard stream" and x[1] == where and x[2] == w)
        vs_stream = f"{stream / r:>10.2f}x" if name in WDS_ROWS.values() else f"{'':>11}"
        print(f"{name:<30} {where:<10} {w:>7} {r:>10,.0f} {ratio:>9.1f}x {vs_stream} "
              f"{r / args.demo_images_per_sec:>6.1f}x")
    print(f"\nencode (32 px, batch 64, {args.encode_images} images): pixels {enc_px:,.0f} img/s, "
          f"tiny AutoencoderKL {enc_vae:,.0f} img/s")


if __name__ == "__main__":
    main()
