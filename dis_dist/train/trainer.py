"""The training loop: diffusion loss, gradient accumulation, strategy step, EMA, logging, sample
grids and checkpoints. It never knows which strategy runs the model."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from dis_dist.config import RunConfig, grad_accumulation, save_config, to_dict, validate
from dis_dist.data import build_loader
from dis_dist.data.encoders import display_decoder
from dis_dist.diffusion import create_diffusion
from dis_dist.diffusion.sampling import sample
from dis_dist.dist.env import DistEnv, single_process_env
from dis_dist.dist.strategy import build_strategy
from dis_dist.errors import CheckpointError
from dis_dist.models import build_model
from dis_dist.train.checkpoint import CheckpointManager, resolve_resume
from dis_dist.train.ema import ema_decay_at
from dis_dist.train.lr import lr_factor
from dis_dist.train.metrics import RunLogger, format_duration, peak_memory_gb
from dis_dist.utils.images import make_grid, save_png, to_uint8

log = logging.getLogger("dis_dist.train")

# Model config keys that change the parameters: a checkpoint only resumes a run that agrees.
ARCHITECTURE_KEYS = ("name", "conditional", "learn_sigma")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class FitResult:
    step: int
    final_loss: float
    wall_time_s: float
    samples_png: Path | None
    images_per_sec: float  # throughput of the last logging window (sample grids, checkpoints excluded)


class Trainer:
    """Builds data, model, diffusion and strategy from a config; ``fit`` runs to ``train.steps``."""

    def __init__(self, cfg: RunConfig, env: DistEnv | None = None) -> None:
        self.env = env or single_process_env(cfg.train.device)
        validate(cfg, self.env.world_size)
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.accum = grad_accumulation(cfg, self.env.world_size)

        self.loader = build_loader(
            cfg.data, batch_size=cfg.train.micro_batch, seed=cfg.train.seed, rank=self.env.rank,
            world_size=self.env.world_size,
        )
        self.num_classes = self.loader.num_classes if cfg.model.conditional else 0
        seed_everything(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(
            cfg.model.name,
            input_size=self.loader.image_size,
            in_channels=self.loader.channels,
            num_classes=self.num_classes,
            learn_sigma=cfg.model.learn_sigma,
            class_dropout_prob=cfg.model.class_dropout_prob,
            drop_path_rate=cfg.model.drop_path_rate,
            scan_backend=cfg.model.scan_backend,
        )
        self.num_params = sum(p.numel() for p in model.parameters())
        seed_everything(cfg.train.seed + self.env.rank)  # per-rank noise, timesteps, dropout
        diff = cfg.diffusion
        self.diffusion = create_diffusion(
            num_steps=diff.num_steps, schedule=diff.schedule, learn_sigma=cfg.model.learn_sigma
        )
        self.sample_diffusion = create_diffusion(
            cfg.sample.steps, num_steps=diff.num_steps, schedule=diff.schedule,
            learn_sigma=cfg.model.learn_sigma,
        )
        opt = cfg.optim

        def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
            return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)

        self.strategy = build_strategy(self.env, cfg, model, make_optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.strategy.optimizer,
            lambda step: lr_factor(
                step, warmup=opt.warmup_steps, total=cfg.train.steps, schedule=opt.schedule,
                min_ratio=opt.min_lr / opt.lr,
            ),
        )
        self._decode = None  # latents -> images for sample grids, built on first use
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.step = 0
        self.ema_updates = 0
        self.skipped_steps = 0
        self.last_loss = float("nan")  # the mean loss of the last logging window
        self.images_per_sec = float("nan")  # and its throughput

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        def write(directory: Path) -> None:
            self.strategy.save(directory)
            torch.save(rng_state(), directory / f"rng_rank{self.env.rank}.pt")
            if self.env.is_main:
                torch.save(
                    {
                        "step": self.step,
                        "ema_updates": self.ema_updates,
                        "skipped_steps": self.skipped_steps,
                        "last_loss": self.last_loss,
                        "scheduler": self.scheduler.state_dict(),
                        "loader": self.loader.state_dict(),
                    },
                    directory / "trainer.pt",
                )
                save_config(self.cfg, directory / "config.yaml")

        path = self.checkpoints.save(self.step, write)
        log.info("saved checkpoint %s", path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        saved = yaml.safe_load((path / "config.yaml").read_text()).get("model", {})
        current = to_dict(self.cfg)["model"]
        for key in ARCHITECTURE_KEYS:
            if saved.get(key) != current[key]:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} holds a model with model.{key}={saved.get(key)!r}, "
                    f"but the config says {current[key]!r}; use another run_dir or --resume none"
                )
        self.strategy.load(path)
        state = torch.load(path / "trainer.pt", weights_only=False)
        self.step = state["step"]
        self.ema_updates = state["ema_updates"]
        self.skipped_steps = state["skipped_steps"]
        self.last_loss = state["last_loss"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(torch.load(path / f"rng_rank{self.env.rank}.pt", weights_only=False))
        log.info("resumed from %s at step %d", path, self.step)

    # -- samples ----------------------------------------------------------------------------
    def sample_grid(self) -> np.ndarray:
        """EMA samples from fixed noise and labels (one row per class), as a uint8 grid."""
        sc = self.cfg.sample
        gen = torch.Generator().manual_seed(sc.seed)
        c, s = self.loader.channels, self.loader.image_size
        noise = torch.randn(sc.num, c, s, s, generator=gen).to(self.env.device)
        labels = None
        ncol = None
        if self.num_classes:
            per_class = max(1, sc.num // self.num_classes)
            labels = (torch.arange(sc.num) // per_class % self.num_classes).to(self.env.device)
            ncol = per_class
        with torch.autocast(self.env.device.type, torch.bfloat16, enabled=self.cfg.train.precision == "bf16"):
            images = sample(
                self.strategy.ema_model(), self.sample_diffusion, noise, labels=labels,
                null_class=self.num_classes, sampler=sc.sampler, ddim_eta=sc.ddim_eta,
                cfg_scale=sc.cfg_scale, cfg_channels=sc.cfg_channels,
                clip_denoised=sc.clip_denoised, generator=gen,
            )
        if self._decode is None:
            self._decode = display_decoder(self.loader.vae, self.loader.scaling_factor, self.env.device)
        return make_grid(to_uint8(self._decode(images)), ncol=ncol)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: str = "auto", stop_at_step: int | None = None) -> FitResult:
        """Train from the checkpoint ``resume`` picks up to ``train.steps``; with ``stop_at_step``,
        stop there (saving a checkpoint) as a preempted run would."""
        cfg, env = self.cfg, self.env
        end_step = min(cfg.train.steps, stop_at_step or cfg.train.steps)
        start = time.perf_counter()
        ckpt = resolve_resume(resume, self.checkpoints)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        elif resume == "none" and self.checkpoints.complete():
            log.warning("--resume none: existing checkpoints in %s will be overwritten", self.checkpoints.root)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        logger = RunLogger(self.run_dir, env.is_main, cfg.train.steps)
        logger.text("config", "```yaml\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "```", self.step)
        log.info(
            "model %s: %.2fM parameters | %d steps, global batch %d = micro %d x %d rank(s) x %d accumulation | %s",
            cfg.model.name, self.num_params / 1e6, cfg.train.steps, cfg.train.global_batch,
            cfg.train.micro_batch, env.world_size, self.accum, env.device,
        )
        model = self.strategy.model
        model.train()
        autocast = torch.autocast(env.device.type, torch.bfloat16, enabled=cfg.train.precision == "bf16")
        # Loss sums stay on the device between logs: no host sync per step. Throughput is
        # measured over the whole window between logs (whose .tolist() syncs a GPU), minus the
        # time spent on sample grids and checkpoints.
        loss_sums = torch.zeros(3, device=env.device)
        window = {"n": 0, "data": 0.0, "other": 0.0, "start": time.perf_counter()}
        saved_at = self.step if ckpt is not None else -1
        sampled_at = -1
        while self.step < end_step:
            for _ in range(self.accum):
                t_data = time.perf_counter()
                x, y = next(self.loader)
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                window["data"] += time.perf_counter() - t_data
                t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=env.device)
                kwargs = {"y": y} if self.num_classes else {}
                with autocast:
                    terms = self.diffusion.training_losses(model, x, t, kwargs)
                loss = terms["loss"].mean()
                self.strategy.backward(loss / self.accum)
                loss_sums += torch.stack([
                    loss.detach(), terms["mse"].detach().mean(),
                    terms["vb"].detach().mean() if "vb" in terms else loss.new_zeros(()),
                ]) / self.accum
            result = self.strategy.step()
            self.scheduler.step()
            self.strategy.update_ema(ema_decay_at(cfg.train.ema_decay, self.ema_updates, cfg.train.ema_warmup))
            self.ema_updates += 1
            self.skipped_steps += int(result.skipped)
            self.step += 1

            window["n"] += 1
            if self.step % cfg.log.every == 0 or self.step == end_step:
                n = window["n"]
                self.last_loss, mse, vb = (loss_sums / n).tolist()
                loss_sums.zero_()
                elapsed = time.perf_counter() - window["start"] - window["other"]
                self.images_per_sec = images_per_sec = n * cfg.train.global_batch / elapsed
                logger.scalars(self.step, {
                    "train/loss": self.last_loss,
                    "train/loss_mse": mse,
                    "train/loss_vb": vb,
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/grad_norm": result.grad_norm,
                    "train/skipped_steps": self.skipped_steps,
                    "data/shard_errors": self.loader.shard_errors,
                    "perf/images_per_sec": images_per_sec,
                    "perf/images_per_sec_per_device": images_per_sec / env.world_size,
                    "perf/step_time_s": elapsed / n,
                    "perf/data_wait_s": window["data"] / n,
                    "perf/peak_memory_gb": peak_memory_gb(env.device),
                })
                logger.progress(self.step, self.last_loss, images_per_sec)
                window = {"n": 0, "data": 0.0, "other": 0.0, "start": time.perf_counter()}
            t_other = time.perf_counter()
            if cfg.sample.every and self.step % cfg.sample.every == 0 and env.is_main:
                grid = self.sample_grid()
                sampled_at = self.step
                logger.image("samples/ema", self.step, grid)
                logger.flush()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
                saved_at = self.step
            window["other"] += time.perf_counter() - t_other
        if saved_at != self.step:
            self.save_checkpoint()
        samples_png = None
        if env.is_main and self.step == cfg.train.steps:
            if sampled_at != self.step:
                grid = self.sample_grid()
                logger.image("samples/ema", self.step, grid)
            samples_png = self.run_dir / "samples.png"
            save_png(grid, samples_png, scale=2)
        logger.close()
        wall = time.perf_counter() - start
        log.info("done: step %d, loss %.4f, %s", self.step, self.last_loss, format_duration(wall))
        return FitResult(self.step, self.last_loss, wall, samples_png, self.images_per_sec)
