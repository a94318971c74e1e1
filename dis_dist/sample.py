"""The sampling command line, ``tools/sample.py`` (same as ``python -m dis_dist.sample``): draws N
samples of a model on any number of ranks (the library: dis_dist/sampling.py) into an
ADM-compatible ``.npz`` and a PNG grid:

    python tools/sample.py exports/dis_h2 --out samples/dis_h2 --num-samples 50000 --cfg-scale 1.5
    torchrun --nproc_per_node=8 tools/sample.py runs/dis_h2 --out samples/dis_h2 --num-samples 50000 \\
        --cfg-scale 1.5

The model is an exported directory, a checkpoint, or a run directory (its newest checkpoint;
EMA weights unless --raw). Each batch is kept as a part file as soon as it is drawn, so a rerun
(after a preemption, on more or fewer ranks) draws only the missing ones. Writes OUT/samples.npz
(``arr_0`` uint8 N x H x W x 3, ``arr_1`` labels: what ADM's evaluator and tools/fid.py read),
OUT/grid.png and OUT/sampling.json (the settings; a rerun with others is refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dis_dist.errors import ConfigError, DataError
from dis_dist.sampling import Sampler, SampleSettings, batches_of_rank
from dis_dist.utils.cli import cli_main, setup_logging

log = logging.getLogger("dis_dist.sample")
SETTINGS_FILE = "sampling.json"
NPZ_FILE = "samples.npz"
GRID_FILE = "grid.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="exported directory, checkpoint directory, or run directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=50_000,
                   help="number of samples (default: 50000)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass on one rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default="uniform",
                   help="uniform (random per sample; default), balanced (i mod classes), or classes: 3 or 0,1,7")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--steps", default="250", help="respaced steps: 250 (the paper's), ddim50, ... (default: 250)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--cfg-channels", choices=("all", "first3"), default="all")
    p.add_argument("--cfg-interval", type=int, nargs=2, default=(0, 1000), metavar=("LO", "HI"),
                   help="guide only the model timesteps LO <= t < HI (default: 0 1000, every step)")
    p.add_argument("--clip-denoised", action="store_true", help="clip predicted x0 to [-1, 1] (pixel models)")
    p.add_argument("--raw", action="store_true", help="a checkpoint's raw weights instead of its EMA")
    p.add_argument("--vae", default=None, help="decode with this VAE (hub id or local directory) instead of "
                   "the one the model was trained with")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    p.add_argument("--scan-backend", default="auto", help="selective-scan backend")
    p.add_argument("--grid", type=int, default=64, help="samples in grid.png (0: none)")
    args = p.parse_args(argv)
    if args.num_samples <= 0 or args.batch_size <= 0:
        p.error("--num-samples and --batch-size must be positive")
    return args


def _settings(args: argparse.Namespace) -> SampleSettings:
    return SampleSettings(
        sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale,
        cfg_channels=args.cfg_channels, cfg_interval=tuple(args.cfg_interval), clip_denoised=args.clip_denoised,
        seed=args.seed, labels=args.labels,
    )


def _agreed_settings(out: Path, record: dict) -> dict:
    """Return the settings ``out`` was started with; a rerun must agree (the batch size aside: the
    parts' layout stays the first run's), or its parts would mix two runs."""
    try:
        saved = json.loads((out / SETTINGS_FILE).read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DataError(f"{out / SETTINGS_FILE} is damaged ({e}): the settings of the samples in {out} are "
                        f"unknown; use another --out, or delete it") from None
    diff = [f"{k}: {saved.get(k)!r} != {v!r}" for k, v in record.items() if k != "batch_size" and saved.get(k) != v]
    if diff:
        raise ConfigError(f"{out} holds samples drawn with other settings ({', '.join(diff)}); "
                          f"use another --out, or delete it")
    return saved


def part_path(out: Path, indices: list[int]) -> Path:
    return out / "parts" / f"{indices[0]:08d}-{indices[-1]:08d}.npz"


PART_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # what np.load of a damaged .npz raises


def part_problem(path: Path, count: int, conditional: bool) -> str | None:
    """Say why the part file at ``path`` does not hold ``count`` whole samples (read and
    CRC-checked), or None when it does."""
    try:
        with np.load(path) as part:
            images, labels = part["images"], part["labels"]
    except PART_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count or images.shape[-1] != 3:
        return f"images are {images.dtype} {images.shape}, not {count} x H x W x 3 uint8"
    if labels.dtype != np.int64 or labels.shape != ((count,) if conditional else (0,)):
        return f"labels are {labels.dtype} {labels.shape}, not {count if conditional else 0} int64"
    return None


def assemble(out: Path, num: int, batch_size: int, conditional: bool, grid: int) -> Path:
    """Join the parts, in index order, into samples.npz without holding them all in memory."""
    from dis_dist.utils.images import make_grid, save_png
    from dis_dist.utils.npz import write_npz

    parts = [part_path(out, idx) for idx in batches_of_rank(num, batch_size, 0, 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} part(s) missing in {out / 'parts'}: {', '.join(missing[:3])}")
    try:  # every part was checked when its rank started; one damaged since is drawn by the next run
        shape = np.load(parts[0])["images"].shape[1:]
        arrays = {"arr_0": ((num, *shape), np.uint8, (np.load(p)["images"] for p in parts))}
        if conditional:
            arrays["arr_1"] = ((num,), np.int64, (np.load(p)["labels"] for p in parts))
        write_npz(out / NPZ_FILE, arrays)
        if grid:
            first: list[np.ndarray] = []
            for p in parts:
                first.extend(np.load(p)["images"][: grid - len(first)])
                if len(first) >= grid:
                    break
            save_png(make_grid(np.stack(first)), out / GRID_FILE)
    except PART_ERRORS as e:
        raise DataError(f"a part in {out / 'parts'} became unreadable while they were joined "
                        f"({type(e).__name__}: {e}): run again to draw it again") from None
    return out / NPZ_FILE


def run(args: argparse.Namespace) -> Path | None:
    from tqdm import tqdm

    from dis_dist.data.encoders import latent_decoder
    from dis_dist.diffusion import create_diffusion
    from dis_dist.distributed.env import init_distributed, ranks_from_env
    from dis_dist.train.export import load_model

    # Ranks finish at different times (a resumed rank may have nothing left to draw): a long
    # timeout for the final barrier.
    env = init_distributed("ddp" if ranks_from_env() else "single", args.device, timeout_min=24 * 60)
    out = Path(args.out)
    model, info = load_model(args.model, ema=not args.raw, device=env.device, scan_backend=args.scan_backend)
    settings = _settings(args)
    # The checkpoint, not only the path: a run directory's newest checkpoint moves on.
    record = {"model": str(Path(args.model).resolve()), "checkpoint": info.get("checkpoint"),
              "weights": info.get("weights"), "num": args.num_samples, "batch_size": args.batch_size,
              **asdict(settings)}
    record = json.loads(json.dumps(record))  # as sampling.json holds it (tuples as lists)
    if env.is_main and not (out / SETTINGS_FILE).is_file():  # the first run records its settings
        out.mkdir(parents=True, exist_ok=True)
        (out / SETTINGS_FILE).write_text(json.dumps(record, indent=2))
    env.barrier()
    saved_batch = _agreed_settings(out, record)["batch_size"]
    if saved_batch != args.batch_size:
        log.warning("--batch-size %d, but %s was started with %d: continuing with %d (the parts' layout)",
                    args.batch_size, out, saved_batch, saved_batch)
    batch_size = saved_batch
    sampler = Sampler(
        create_diffusion(settings.steps, num_steps=info["diffusion"]["num_steps"],
                         schedule=info["diffusion"]["schedule"], learn_sigma=info["learn_sigma"]),
        settings, latent_decoder(args.vae or info.get("vae", "pixels"), info.get("scaling_factor", 1.0), env.device),
        env.device, bf16=args.precision == "bf16" or (args.precision == "auto" and env.device.type == "cuda"),
    )

    conditional = bool(info["num_classes"])

    def whole(indices: list[int]) -> bool:
        """Tell whether a part was drawn before, checked: a damaged one (a crash mid-write on a filesystem
        without atomic renames, a truncated copy) is drawn again."""
        path = part_path(out, indices)
        if not path.is_file():
            return False
        problem = part_problem(path, len(indices), conditional)
        if problem is not None:
            log.warning("%s is damaged (%s): drawing it again", path, problem)
        return problem is None

    mine = batches_of_rank(args.num_samples, batch_size, env.rank, env.world_size)
    have = {idx[0] for idx in mine if whole(idx)}
    todo = len(mine) - len(have)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if env.is_main:
        log.info("%s: %d samples of %dx%d, %s %s steps, guidance %.2f, on %d rank(s); rank 0 draws %d batches",
                 args.model, args.num_samples, info["input_size"], info["input_size"], settings.sampler,
                 settings.steps, settings.cfg_scale, env.world_size, todo)
    share = sampler.share(model, args.num_samples, batch_size, rank=env.rank, world_size=env.world_size,
                          done=lambda idx: idx[0] in have)
    for indices, images, labels in tqdm(share, total=todo, desc=f"rank {env.rank}", unit="batch",
                                        disable=not env.is_main or None):
        path = part_path(out, indices)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, images=images, labels=labels if labels is not None else np.zeros(0, np.int64))
        tmp.replace(path)
    env.barrier()
    if not env.is_main:
        return None
    return assemble(out, args.num_samples, batch_size, conditional, args.grid)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    path = run(args)
    if path is not None:
        print(f"{args.num_samples} samples: {path}" + (f"  grid: {Path(args.out) / GRID_FILE}" if args.grid else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
