"""The training loop: diffusion loss, gradient accumulation, strategy step, EMA, logging, sample
grids and checkpoints. It never knows which strategy runs the model."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from dis_dist.config import RunConfig, grad_accumulation, save_config, to_dict, validate
from dis_dist.data import build_loader
from dis_dist.data.encoders import display_decoder
from dis_dist.diffusion import create_diffusion
from dis_dist.distributed.env import DistEnv, bound_host_heap, context_parallel_group, init_distributed
from dis_dist.distributed.strategy import StepResult, build_strategy
from dis_dist.errors import CheckpointError, CheckpointMismatch, RunDirError, TrainingError
from dis_dist.eval.fid import format_metrics
from dis_dist.models import build_model
from dis_dist.models.flops import model_flops
from dis_dist.plan import sample_batch_size
from dis_dist.sample import generate_share, sample_settings
from dis_dist.train.checkpoint import CheckpointManager, resolve_resume, verify_checkpoint
from dis_dist.train.ema import ema_decay_at
from dis_dist.train.evaluation import Evaluator
from dis_dist.train.metrics import RunLogger, format_duration, free_memory_bytes, peak_flops, peak_memory_gb
from dis_dist.train.optim import adamw, lr_factor
from dis_dist.train.preemption import StopRequest
from dis_dist.train.run_lock import RunLock
from dis_dist.train.safe_load import load_torch
from dis_dist.utils.images import make_grid, save_png
from dis_dist.utils.seeding import mix_seed

log = logging.getLogger("dis_dist.train")

TRAINER_STATE = "trainer.json"  # step, counters, schedule and data position of a checkpoint
MODEL_INFO = "model.json"  # what build_model needs, and what the weights were trained on
# The seed stream of the model's own randomness (label dropout, drop path), beside the noise's.
MODEL_RANDOMNESS = 1


def _json_object(file: Path) -> dict:
    """A checkpoint's JSON file, which must hold an object; CheckpointError naming it otherwise."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return data


@dataclass
class FitResult:
    step: int
    final_loss: float
    wall_time_s: float
    samples_png: Path | None
    images_per_sec: float  # throughput of the last logging window (sample grids, checkpoints excluded)
    stopped: str | None = None  # why training stopped early (a signal or request), after saving
    metrics: dict[str, float] = field(default_factory=dict)  # of the last evaluation (rank 0)


class Trainer:
    """Builds data, model, diffusion and strategy from a config; ``fit`` runs to ``train.steps``."""

    def __init__(self, cfg: RunConfig, env: DistEnv | None = None) -> None:
        self.env = env or init_distributed(cfg.dist.strategy, cfg.train.device, cfg.dist.timeout_min)
        validate(cfg, self.env.world_size)
        if self.env.device.type == "cpu" and self.env.world_size > 1:
            bound_host_heap()
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.accum = grad_accumulation(cfg, self.env.world_size)
        # Data-parallel ranks hold different samples; the dist.context_parallel consecutive ranks
        # of a context-parallel group the same ones (data, noise, dropout), each a slice of tokens.
        cp = cfg.dist.context_parallel
        self.dp_rank, self.dp_size = self.env.rank // cp, self.env.world_size // cp
        self.cp_group = context_parallel_group(self.env, cp)

        self.loader = build_loader(
            cfg.data, batch_size=cfg.train.micro_batch, seed=cfg.train.seed, rank=self.dp_rank,
            world_size=self.dp_size,
        )
        self.num_classes = self.loader.num_classes if cfg.model.conditional else 0
        # What build_model needs to rebuild this model anywhere (saved with every checkpoint).
        self.model_spec = {
            "name": cfg.model.name, "input_size": self.loader.image_size,
            "in_channels": self.loader.channels, "num_classes": self.num_classes,
            "learn_sigma": cfg.model.learn_sigma,
        }
        # On the meta device: the strategy shards it, then gives storage to each rank's share and
        # initialises it from train.seed (dis_dist/distributed/init.py), the same weights at any world size.
        with torch.device("meta"):
            model = build_model(
                **self.model_spec,
                class_dropout_prob=cfg.model.class_dropout_prob,
                drop_path_rate=cfg.model.drop_path_rate,
                scan_backend=cfg.model.scan_backend,
            )
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.num_params = sum(p.numel() for p in model.parameters())
        # Training FLOPs per image (forward + backward = 3x forward), for MFU.
        self.flops_per_image = 3 * model_flops(**self.model_spec).total
        diff = cfg.diffusion
        self.diffusion = create_diffusion(
            num_steps=diff.num_steps, schedule=diff.schedule, learn_sigma=cfg.model.learn_sigma,
            min_snr_gamma=diff.min_snr_gamma,
        )
        self.sample_diffusion = create_diffusion(
            cfg.sample.steps, num_steps=diff.num_steps, schedule=diff.schedule,
            learn_sigma=cfg.model.learn_sigma,
        )
        opt = cfg.optim

        def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
            return adamw(groups, opt, self.env.device)

        def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda step: lr_factor(
                    step, warmup=opt.warmup_steps, total=cfg.train.steps, schedule=opt.schedule,
                    min_ratio=opt.min_lr / opt.lr,
                ),
            )

        self.strategy = build_strategy(self.env, cfg, model, self.accum, make_optimizer, make_scheduler)
        self.module = model  # the DiS itself, whichever wrapper the strategy calls (sharded in place)
        model.set_context_parallel(self.cp_group)
        self.scheduler = self.strategy.scheduler
        self._decode = None  # latents -> images for sample grids, built on first use
        self.sample_batch = cfg.sample.batch_size or self._planned_sample_batch()
        self.evaluator = (Evaluator(cfg, self.env, self.model_spec, self.loader.vae, self.loader.scaling_factor,
                                    self.sample_batch) if cfg.eval.every else None)
        self.metrics: dict[str, float] = {}  # of the last evaluation
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every
        )
        self.step = 0
        self.ema_updates = 0
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self.failures: dict[str, int] = {}  # of periodic work that must not cost training, by tag
        self.stopped: str | None = None  # why fit stopped before its end step (a signal, a request)
        self.last_loss = float("nan")  # the mean loss of the last logging window
        self.images_per_sec = float("nan")  # and its throughput

    def _planned_sample_batch(self) -> int:
        """Samples per forward pass: the planner's inference estimate against half of this
        rank's free memory, now that the training state is allocated."""
        sc = self.cfg.sample
        return sample_batch_size(
            self.cfg.model.name, latent=self.loader.image_size, channels=self.loader.channels,
            num_classes=self.num_classes, precision=self.cfg.train.precision,
            guidance=bool(self.num_classes) and sc.cfg_scale != 1.0,
            free_bytes=free_memory_bytes(self.env.device, self.env.local_world_size),
        )

    # -- checkpoints ------------------------------------------------------------------------
    def model_info(self) -> dict:
        """What ``model.json`` records: build_model's arguments, the strategy, and the data and
        diffusion the weights belong to. A checkpoint resumes only a run that agrees on all of it."""
        return {**self.model_spec, "strategy": self.strategy.name, "vae": self.loader.vae,
                "scaling_factor": self.loader.scaling_factor, "class_names": list(self.loader.class_names),
                "diffusion": {"num_steps": self.cfg.diffusion.num_steps, "schedule": self.cfg.diffusion.schedule}}

    def save_checkpoint(self) -> Path:
        def write(directory: Path) -> Future | None:
            pending = self.strategy.save(directory)
            if self.env.is_main:
                state = {
                    "step": self.step,
                    "ema_updates": self.ema_updates,
                    "skipped_steps": self.skipped_steps,
                    "last_loss": self.last_loss if math.isfinite(self.last_loss) else None,
                    "scheduler": self.scheduler.state_dict(),
                    "loader": self.loader.state_dict(),
                }
                (directory / TRAINER_STATE).write_text(json.dumps(state, indent=1))
                save_config(self.cfg, directory / "config.yaml")
                (directory / MODEL_INFO).write_text(json.dumps(self.model_info(), indent=2))
            return pending

        path = self.checkpoints.save(self.step, write, is_main=self.env.is_main, barrier=self.env.barrier)
        if self.env.is_main:
            log.info("saved checkpoint %s%s", path, " (shards written in the background)"
                     if self.cfg.checkpoint.async_save else "")
        return path

    def check_model_info(self, path: Path) -> None:
        """Raise CheckpointError naming every key of ``path``'s model.json that differs from this run."""
        saved = _json_object(path / MODEL_INFO)
        current = json.loads(json.dumps(self.model_info()))  # tuples as lists, as saved
        diffs = [f"{key}: checkpoint {saved.get(key, '(none)')!r}, this run {current.get(key, '(none)')!r}"
                 for key in sorted(current.keys() | saved.keys()) if saved.get(key) != current.get(key)]
        if diffs:
            raise CheckpointMismatch(
                f"checkpoint {str(path)!r} belongs to another model or data than this run ("
                + "; ".join(diffs) + "): use another run_dir, --resume none, or the settings it was trained with"
            )

    def _read_trainer_state(self, path: Path) -> dict:
        if not (path / TRAINER_STATE).is_file() and (path / "trainer.pt").is_file():  # written before
            return load_torch(path / "trainer.pt")  # trainer.json existed
        return _json_object(path / TRAINER_STATE)

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything a checkpoint holds (collective). Raises CheckpointError."""
        self.check_model_info(path)
        state = self._read_trainer_state(path)
        self.strategy.load(path)
        try:
            self.step = int(state["step"])
            self.ema_updates = int(state["ema_updates"])
            self.skipped_steps = int(state["skipped_steps"])
            self.last_loss = float("nan") if state["last_loss"] is None else float(state["last_loss"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.loader.load_state_dict(state["loader"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path / TRAINER_STATE} is damaged: {type(e).__name__}: {e}") from None
        log.info("resumed from %s at step %d", path, self.step)

    def _resume(self, resume: str) -> Path | None:
        """Collective. Load the checkpoint ``--resume`` names and return its path: with "auto",
        the newest complete one that loads (damaged ones are skipped with a warning); None when
        there is none (a fresh run) or with "none"."""
        choice: list = [None]  # rank 0's candidates, or its error (every rank raises it)
        if self.env.is_main:
            try:
                if resume == "auto":
                    choice = [[str(p) for _, p in reversed(self.checkpoints.complete())]]
                else:
                    path = resolve_resume(resume, self.checkpoints)
                    choice = [[str(path)] if path is not None else []]
            except CheckpointError as e:
                choice = [str(e)]
        if self.env.distributed:
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str):
            raise CheckpointError(choice[0])
        candidates = [Path(p) for p in choice[0]]
        failures = []
        for path in candidates:
            # Rank 0 checks the files (cheap: no tensor data is read); then every rank loads.
            reason = self._agree(self._attempt(verify_checkpoint, path) if self.env.is_main else None)
            if reason is None:
                reason = self._agree(self._attempt(self.load_checkpoint, path))
            if reason is None:
                return path
            if resume != "auto":
                raise CheckpointError(reason)
            failures.append(f"{path.name}: {reason}")
            if self.env.is_main:
                log.warning("skipping checkpoint %s: %s", path, reason)
        if failures:
            raise CheckpointError(
                f"no loadable checkpoint in {str(self.checkpoints.root)!r} ({'; '.join(failures)}); "
                f"restore one, or start afresh with --resume none"
            )
        return None

    @staticmethod
    def _attempt(fn: Callable[[Path], None], path: Path) -> str | None:
        """None when ``fn(path)`` succeeds; the reason when it raises CheckpointError (a
        checkpoint that belongs to another run raises on: it is no reason to fall back)."""
        try:
            fn(path)
        except CheckpointMismatch:
            raise
        except CheckpointError as e:
            return str(e)
        return None

    def _agree(self, reason: str | None) -> str | None:
        """The first reason any rank has (None when none has one)."""
        if not self.env.distributed:
            return reason
        reasons: list[str | None] = [None] * self.env.world_size
        dist.all_gather_object(reasons, reason)
        return next((f"rank {r}: {x}" for r, x in enumerate(reasons) if x is not None), None)

    # -- samples ----------------------------------------------------------------------------
    def sample_grid(self) -> np.ndarray | None:
        """Collective. ``sample.num`` EMA samples from fixed noise and labels (a row per class),
        drawn by every rank in micro-batches of ``sample.batch_size``; a uint8 grid on rank 0
        (None elsewhere)."""
        sc = self.cfg.sample
        if self._decode is None:
            self._decode = display_decoder(self.loader.vae, self.loader.scaling_factor, self.env.device)
        mine = []
        with self._ema_for_sampling() as (model, collective):
            for indices, images, labels in generate_share(
                model, self.sample_diffusion, sc.num, self.sample_batch, rank=self.env.rank,
                world_size=self.env.world_size, collective=collective, channels=self.loader.channels,
                size=self.loader.image_size, num_classes=self.num_classes, settings=sample_settings(self.cfg),
                decode=self._decode, device=self.env.device, bf16=self.cfg.train.precision == "bf16",
            ):
                mine.append((indices, images, labels))
        parts = [mine]
        if self.env.distributed:
            parts = [None] * self.env.world_size
            dist.all_gather_object(parts, mine)
        if not self.env.is_main:
            return None
        batches = sorted((b for part in parts for b in part), key=lambda b: b[0][0])
        images = np.concatenate([b[1] for b in batches])
        if not self.num_classes:
            return make_grid(images)
        labels = np.concatenate([b[2] for b in batches])  # sample i is of class i mod classes
        per_class = sc.num // self.num_classes
        return make_grid(images[np.argsort(labels, kind="stable")], ncol=per_class or None)

    @contextmanager
    def _ema_for_sampling(self) -> Iterator[tuple[torch.nn.Module, bool]]:
        """The strategy's EMA model for sampling, each rank with whole sequences: the ranks of a
        context-parallel group draw different samples, as all ranks do."""
        self.module.set_context_parallel(None)
        try:
            with self.strategy.ema_for_sampling() as lent:
                yield lent
        finally:
            self.module.set_context_parallel(self.cp_group)

    def evaluate(self, logger: RunLogger) -> None:
        """Collective. Score eval.num_samples EMA samples; log the metrics (rank 0)."""
        start = time.perf_counter()
        with self._ema_for_sampling() as (model, collective):
            metrics = self.evaluator(model, self.sample_diffusion, collective)
        if metrics is None:
            return
        self.metrics = metrics
        logger.scalars(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        logger.flush()
        log.info("eval at step %d (%d samples vs %s, %.0f s): %s", self.step, self.cfg.eval.num_samples,
                 self.cfg.eval.reference, time.perf_counter() - start, format_metrics(metrics))

    # -- the loop ---------------------------------------------------------------------------
    def _randomness(self, x: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and noise of one micro-batch, and the seed of the model's own randomness
        (label dropout and drop path, which read the global RNG because activation checkpointing
        replays it), all from the micro-batch's place in the global batch: a run draws the same
        whatever its number of ranks (for the same micro-batch), and a resumed run what the
        uninterrupted one drew, with no RNG state to save. The ranks of a context-parallel group
        draw alike."""
        chunk = (self.step * self.accum + micro) * self.dp_size + self.dp_rank
        gen = torch.Generator(self.env.device).manual_seed(mix_seed(self.cfg.train.seed, chunk))
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device, generator=gen)
        noise = torch.randn(x.shape, device=x.device, generator=gen)
        torch.manual_seed(mix_seed(self.cfg.train.seed, chunk, MODEL_RANDOMNESS))
        return t, noise

    def _gather_stats(self, values: torch.Tensor) -> torch.Tensor:
        """(world, k) of every rank's ``values`` (k,), on rank 0 and everywhere."""
        if not self.env.distributed:
            return values[None]
        out = [torch.empty_like(values) for _ in range(self.env.world_size)]
        dist.all_gather(out, values)
        return torch.stack(out)

    def _check_finite(self, result: StepResult) -> None:
        """Count non-finite steps; too many in a row end training with a clear error."""
        if not result.skipped:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        limit = self.cfg.train.max_skipped_in_a_row
        if self.env.is_main:
            log.warning("step %d: non-finite loss or gradient norm (%s); update skipped (%d in a row)",
                        self.step, result.grad_norm, self.skipped_in_a_row)
        if limit and self.skipped_in_a_row >= limit:
            newest = self.checkpoints.latest()
            raise TrainingError(
                f"{self.skipped_in_a_row} steps in a row (up to step {self.step}) had a non-finite loss or "
                f"gradient norm (train.max_skipped_in_a_row={limit}). The newest checkpoint, "
                f"{newest or 'none'}, holds the last good weights: lower optim.lr, raise optim.warmup_steps "
                f"or check the data, then resume with --resume auto"
            )

    @contextmanager
    def _run_dir_lease(self) -> Iterator[RunLock | None]:
        """Collective. Rank 0 holds ``run_dir``'s lease (dis_dist/train/run_lock.py) while the
        block runs; when it cannot have it, every rank raises RunDirError before touching anything."""
        lock, error = None, None
        if self.env.is_main and self.cfg.checkpoint.lock_lease_s:
            lock = RunLock(self.run_dir, self.cfg.checkpoint.lock_lease_s)
            try:
                lock.acquire()
            except RunDirError as e:
                lock, error = None, str(e)
        if self.env.distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise RunDirError(error)
        try:
            yield lock
        finally:
            if lock is not None:
                lock.release()

    def _guarded(self, what: str, tag: str, logger: RunLogger, work: Callable[[], None]) -> None:
        """Run periodic work whose failure must never cost training (a sample grid, an
        evaluation): a failure is logged in one line and counted in TensorBoard as
        ``{tag}/failures``, and training goes on."""
        try:
            work()
        except Exception as e:  # a NaN reference's eigh, a decoder out of memory, a full cache disk...
            self.failures[tag] = self.failures.get(tag, 0) + 1
            first_line = (str(e).strip().splitlines() or [""])[0]
            log.error("%s at step %d failed (%s: %s); training goes on (%d such failure(s) so far)",
                      what, self.step, type(e).__name__, first_line, self.failures[tag])
            logger.scalars(self.step, {f"{tag}/failures": self.failures[tag]})

    def fit(self, resume: str = "auto", stop_at_step: int | None = None) -> FitResult:
        """Train from the checkpoint ``resume`` picks up to ``train.steps``; with ``stop_at_step``,
        stop there (saving a checkpoint) as a preempted run would. Holds ``run_dir`` for the run:
        a second job on it is refused."""
        with self._run_dir_lease() as lease:
            return self._fit(resume, stop_at_step, lease)

    def _fit(self, resume: str, stop_at_step: int | None, lease: RunLock | None) -> FitResult:
        cfg, env = self.cfg, self.env
        end_step = min(cfg.train.steps, stop_at_step or cfg.train.steps)
        start = time.perf_counter()
        ckpt = self._resume(resume)
        if ckpt is None and resume == "none" and env.is_main and self.checkpoints.complete():
            log.warning("--resume none: existing checkpoints in %s will be overwritten", self.checkpoints.root)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        logger = RunLogger(self.run_dir, env.is_main, cfg.train.steps, first_step=self.step + 1)
        logger.text("config", "```yaml\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False) + "```", self.step)
        if env.is_main:
            log.info(
                "model %s: %.2fM parameters | %d steps, global batch %d = micro %d x %d rank(s) x %d "
                "accumulation%s | %s on %s | sampling %d images per forward pass%s",
                cfg.model.name, self.num_params / 1e6, cfg.train.steps, cfg.train.global_batch,
                cfg.train.micro_batch, self.dp_size, self.accum,
                f", each sample's tokens split over {cfg.dist.context_parallel} ranks" if self.cp_group else "",
                self.strategy.name, env.device,
                self.sample_batch, "" if cfg.sample.batch_size else " (planned)",
            )
        model = self.strategy.model
        model.train()
        autocast = torch.autocast(env.device.type, torch.bfloat16, enabled=cfg.train.precision == "bf16")
        device_peak = peak_flops(env.device, cfg.train.precision)
        # Loss sums stay on the device between logs: no host sync per step. Throughput is
        # measured over the whole window between logs (whose gather syncs a GPU), minus the
        # time spent on sample grids and checkpoints.
        loss_sums = torch.zeros(3, device=env.device)
        window = {"n": 0, "data": 0.0, "other": 0.0, "start": time.perf_counter()}
        saved_at = self.step if ckpt is not None else -1
        sampled_at, grid, evaluated_at = -1, None, -1

        def log_grid(image: np.ndarray | None) -> None:
            nonlocal grid
            grid = image
            if grid is not None:
                logger.image("samples/ema", self.step, grid)
                logger.flush()

        with StopRequest(env, self.run_dir) as stop:
            stop.clear()  # a request left by an earlier job was handled by its save
            while self.step < end_step:
                for micro in range(self.accum):
                    t_data = time.perf_counter()
                    x, y = next(self.loader)
                    x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                    window["data"] += time.perf_counter() - t_data
                    t, noise = self._randomness(x, micro)
                    kwargs = {"y": y} if self.num_classes else {}
                    with self.strategy.micro_batch(last=micro == self.accum - 1):
                        with autocast:
                            terms = self.diffusion.training_losses(model, x, t, kwargs, noise=noise)
                        loss = terms["loss"].mean()
                        self.strategy.backward(loss)
                    loss_sums += torch.stack([
                        loss.detach(), terms["mse"].detach().mean(),
                        terms["vb"].detach().mean() if "vb" in terms else loss.new_zeros(()),
                    ]).float() / self.accum
                result = self.strategy.step()
                self.strategy.update_ema(ema_decay_at(cfg.train.ema_decay, self.ema_updates, cfg.train.ema_warmup))
                self.ema_updates += 1
                self.skipped_steps += int(result.skipped)
                self.step += 1
                self._check_finite(result)
                if lease is not None:
                    lease.check()

                window["n"] += 1
                if self.step % cfg.log.every == 0 or self.step == end_step:
                    n = window["n"]
                    mem = torch.tensor([peak_memory_gb(env.device)], device=env.device)
                    stats = self._gather_stats(torch.cat([loss_sums / n, mem]))
                    self.last_loss, mse, vb = stats[:, :3].mean(0).tolist()
                    memory = stats[:, 3].tolist()
                    loss_sums.zero_()
                    elapsed = time.perf_counter() - window["start"] - window["other"]
                    self.images_per_sec = images_per_sec = n * cfg.train.global_batch / elapsed
                    scalars = {
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
                        "perf/peak_memory_gb": max(memory),
                        **{f"memory/peak_gb_rank{r}": m for r, m in enumerate(memory)},
                    }
                    if device_peak:
                        scalars["perf/mfu"] = images_per_sec * self.flops_per_image / (device_peak * env.world_size)
                    logger.scalars(self.step, scalars)
                    logger.progress(self.step, self.last_loss, images_per_sec)
                    window = {"n": 0, "data": 0.0, "other": 0.0, "start": time.perf_counter()}
                t_other = time.perf_counter()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:  # first: work is never lost
                    self.save_checkpoint()
                    saved_at = self.step
                if cfg.sample.every and self.step % cfg.sample.every == 0:
                    sampled_at = self.step
                    self._guarded("sample grid", "samples", logger, lambda: log_grid(self.sample_grid()))
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    evaluated_at = self.step
                    self._guarded("evaluation", "eval", logger, lambda: self.evaluate(logger))
                window["other"] += time.perf_counter() - t_other
                if stop.poll():
                    self.stopped = stop.reason or "stop requested on another rank"
                    break
            if self.stopped:
                stop.clear()
        if saved_at != self.step:
            self.save_checkpoint()
        self.checkpoints.finish()
        if self.stopped and env.is_main:
            log.warning("stopped at step %d (%s) after saving a checkpoint; resume with --resume auto",
                        self.step, self.stopped)
        samples_png = None
        if self.step == cfg.train.steps:
            if sampled_at != self.step and cfg.sample.num > 0:
                self._guarded("sample grid", "samples", logger, lambda: log_grid(self.sample_grid()))
            if grid is not None:
                samples_png = self.run_dir / "samples.png"
                save_png(grid, samples_png, scale=2)
            if self.evaluator is not None and evaluated_at != self.step:
                self._guarded("evaluation", "eval", logger, lambda: self.evaluate(logger))
        logger.close()
        wall = time.perf_counter() - start
        if env.is_main:
            log.info("done: step %d, loss %.4f, %s", self.step, self.last_loss, format_duration(wall))
        return FitResult(self.step, self.last_loss, wall, samples_png, self.images_per_sec, self.stopped,
                         self.metrics)
