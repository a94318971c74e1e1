"""Drawing N samples of a model on any number of ranks: the driver behind the trainer's grids,
its evaluations and ``tools/sample.py`` / ``python -m dis_dist.sample`` (the sampler loop itself is
:func:`dis_dist.diffusion.sampling.sample`).

Samples by index: sample i depends only on (seed, i), never on the batch or rank that draws it,
so N samples are the same N images on any number of ranks and batch layouts (bit for bit when
the batches are the same, as :func:`batches_of_rank` arranges).

The command line writes them into an ADM-compatible ``.npz`` and a PNG grid:

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
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dis_dist.config import RunConfig
from dis_dist.diffusion import GaussianDiffusion
from dis_dist.diffusion.sampling import sample
from dis_dist.errors import ConfigError, DataError
from dis_dist.utils.cli import cli_main, setup_logging
from dis_dist.utils.images import to_uint8
from dis_dist.utils.seeding import mix_seed

log = logging.getLogger("dis_dist.sample")
SETTINGS_FILE = "sampling.json"
NPZ_FILE = "samples.npz"
GRID_FILE = "grid.png"
LABEL_STREAM = 1  # labels come from a generator of their own: (seed, i, LABEL_STREAM)


@dataclass
class SampleSettings:
    """How to draw samples (the sampler's respacing, guidance, seed and labels)."""

    sampler: str = "ddpm"  # ddpm (ancestral) or ddim
    steps: str = "250"  # respacing: "250", "ddim50", ...
    eta: float = 0.0  # ddim only
    cfg_scale: float = 1.0
    cfg_channels: str = "all"
    cfg_interval: tuple[int, int] = (0, 1000)  # model timesteps [lo, hi) that are guided
    clip_denoised: bool = False
    seed: int = 0
    labels: str = "uniform"  # uniform (random per sample), balanced (i % classes), or "3" / "0,1,7"


def sample_settings(cfg: RunConfig) -> SampleSettings:
    """The ``sample.*`` settings, with class-balanced labels (sample i is of class i mod classes):
    what grids and evaluations during training draw."""
    sc = cfg.sample
    return SampleSettings(
        sampler=sc.sampler, steps=sc.steps, eta=sc.ddim_eta, cfg_scale=sc.cfg_scale,
        cfg_channels=sc.cfg_channels, cfg_interval=tuple(sc.cfg_interval), clip_denoised=sc.clip_denoised,
        seed=sc.seed, labels="balanced",
    )


def sample_labels(spec: str, indices: list[int], num_classes: int, seed: int) -> Tensor:
    """The class of each sample: ``uniform`` draws it from the sample's own generator,
    ``balanced`` is i mod classes, a comma list repeats its classes in turn."""
    if spec == "uniform":
        gens = (torch.Generator().manual_seed(mix_seed(seed, i, LABEL_STREAM)) for i in indices)
        return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in gens])
    if spec == "balanced":
        return torch.tensor([i % num_classes for i in indices])
    try:
        given = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(f"labels {spec!r}: choose uniform, balanced, or class indices like 3 or 0,1,7") from None
    if any(not 0 <= c < num_classes for c in given):
        raise ConfigError(f"labels {spec!r}: classes must be in [0, {num_classes})")
    return torch.tensor([given[i % len(given)] for i in indices])


def batches_of_rank(num: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Sample indices of the batches rank ``rank`` draws: batch b is [b*B, (b+1)*B) and goes
    to rank b mod W, so the batches themselves do not depend on the world size."""
    total = -(-num // batch_size)
    return [list(range(b * batch_size, min(num, (b + 1) * batch_size))) for b in range(rank, total, world_size)]


def generate(
    model: Callable[..., Tensor], diffusion: GaussianDiffusion, indices: list[int], *,
    channels: int, size: int, num_classes: int, settings: SampleSettings,
    decode: Callable[[Tensor], Tensor], device: torch.device, bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples ``indices``: uint8 (n, H, W, 3) images (one channel repeated to three) and their
    labels (None for an unconditional model)."""
    gens = [torch.Generator(device).manual_seed(mix_seed(settings.seed, i)) for i in indices]
    noise = torch.stack([torch.randn(channels, size, size, generator=g, device=device) for g in gens])
    labels = sample_labels(settings.labels, indices, num_classes, settings.seed).to(device) if num_classes else None
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        latents = sample(
            model, diffusion, noise, labels=labels, null_class=num_classes or None,
            sampler=settings.sampler, ddim_eta=settings.eta, cfg_scale=settings.cfg_scale,
            cfg_channels=settings.cfg_channels, cfg_interval=settings.cfg_interval,
            clip_denoised=settings.clip_denoised, generator=gens,
        )
    images = to_uint8(decode(latents.float()))
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images, None if labels is None else labels.cpu().numpy()


def generate_share(
    model: Callable[..., Tensor], diffusion: GaussianDiffusion, num: int, batch_size: int, *,
    rank: int, world_size: int, collective: bool = False, done: Callable[[list[int]], bool] | None = None,
    **kwargs: object,
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray | None]]:
    """This rank's share of samples 0..num-1 (:func:`batches_of_rank`), a batch at a time:
    (indices, images, labels); ``kwargs`` go to :func:`generate`. ``done``: batches already drawn
    (a resumed run's), skipped. With a ``collective`` model (a sharded one, whose forward pass
    gathers weights from every rank) a rank with fewer batches draws throwaway ones so that every
    rank calls the model equally often."""
    if collective and done is not None:
        raise ValueError("a collective model draws every batch: ranks cannot skip different ones")
    mine = [b for b in batches_of_rank(num, batch_size, rank, world_size) if done is None or not done(b)]
    rounds = len(batches_of_rank(num, batch_size, 0, world_size)) if collective else len(mine)
    for r in range(rounds):
        if r < len(mine):
            yield mine[r], *generate(model, diffusion, mine[r], **kwargs)
        else:
            generate(model, diffusion, [0], **kwargs)


# -- the command line -----------------------------------------------------------------------


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
    """The settings ``out`` was started with; a rerun must agree (the batch size aside: the
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
    """Why the part file at ``path`` does not hold ``count`` whole samples (read and
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
    diffusion = create_diffusion(settings.steps, num_steps=info["diffusion"]["num_steps"],
                                 schedule=info["diffusion"]["schedule"], learn_sigma=info["learn_sigma"])
    decode = latent_decoder(args.vae or info.get("vae", "pixels"), info.get("scaling_factor", 1.0), env.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and env.device.type == "cuda")

    conditional = bool(info["num_classes"])

    def whole(indices: list[int]) -> bool:
        """A part drawn before, checked: a damaged one (a crash mid-write on a filesystem
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
    share = generate_share(
        model, diffusion, args.num_samples, batch_size, rank=env.rank, world_size=env.world_size,
        done=lambda idx: idx[0] in have,
        channels=info["in_channels"], size=info["input_size"], num_classes=info["num_classes"],
        settings=settings, decode=decode, device=env.device, bf16=bf16,
    )
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
