"""The training loop: diffusion loss, gradient accumulation, strategy step, EMA, logging, sample
grids, evaluations and checkpoints. It never knows which strategy runs the model."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from dis_dist.config import RunConfig, grad_accumulation, save_config, to_dict, validate
from dis_dist.data import build_loader
from dis_dist.data.encoders import display_decoder
from dis_dist.diffusion import create_diffusion
from dis_dist.distributed.env import DistEnv, bound_host_heap, context_parallel_group, init_distributed
from dis_dist.distributed.registry import build_strategy
from dis_dist.distributed.strategy import StepResult
from dis_dist.errors import CheckpointError, CheckpointMismatch, TrainingError
from dis_dist.eval.fid import format_metrics
from dis_dist.models import DiS
from dis_dist.models.spec import ModelSpec
from dis_dist.plan import sample_batch_size
from dis_dist.sampling import Sampler, SampleSettings
from dis_dist.train.checkpoint import CheckpointManager, resume_agreed
from dis_dist.train.evaluation import Evaluator
from dis_dist.train.metrics import RunLogger, format_duration, free_memory_bytes, peak_flops, peak_memory_gb
from dis_dist.train.optim import adamw, ema_decay_at, lr_factor
from dis_dist.train.preemption import StopRequest
from dis_dist.train.run_lock import hold_run_dir
from dis_dist.utils.images import make_grid, save_png
from dis_dist.utils.seeding import mix_seed

log = logging.getLogger("dis_dist.train")

TRAINER_STATE = "trainer.json"  # step, counters, schedule and data position of a checkpoint
MODEL_INFO = "model.json"  # what build_model needs, and what the weights were trained on
# The seed stream of the model's own randomness (label dropout, drop path), beside the noise's.
MODEL_RANDOMNESS = 1


def _json_object(file: Path) -> dict:
    """Read a checkpoint's JSON file, which must hold an object; raise CheckpointError naming it otherwise."""
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


@dataclass
class LogWindow:
    """Holds what the steps since the last log add up to: their loss sums, kept on the device (no
    host sync per step), and how long they took, of which how much went to waiting for data and
    to periodic work (grids, evaluations, checkpoints), which throughput leaves out."""

    losses: Tensor  # (3,): sums of the loss, its mse and its vb term, each a mean over micro-batches
    steps: int = 0
    data_s: float = 0.0
    other_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class Done:
    """Records the step at which periodic work last ran (-1: not in this run), and the last grid drawn."""

    checkpoint: int = -1
    grid_step: int = -1
    evaluation: int = -1
    grid: np.ndarray | None = None


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
        self.loader = build_loader(cfg.data, batch_size=cfg.train.micro_batch, seed=cfg.train.seed,
                                   rank=self.dp_rank, world_size=self.dp_size)
        self.num_classes = self.loader.num_classes if cfg.model.conditional else 0
        # What build_model needs to rebuild this model anywhere (saved with every checkpoint).
        self.spec = ModelSpec(cfg.model.name, self.loader.image_size, self.loader.channels, self.num_classes,
                              cfg.model.learn_sigma)
        self._build_model_and_strategy()
        self._build_sampling()
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                             cfg.checkpoint.keep_every)
        self.step = 0
        self.ema_updates = 0
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self.failures: dict[str, int] = {}  # of periodic work that must not cost training, by tag
        self.stopped: str | None = None  # why fit stopped before its end step (a signal, a request)
        self.last_loss = float("nan")  # the mean loss of the last logging window
        self.images_per_sec = float("nan")  # and its throughput
        self.metrics: dict[str, float] = {}  # of the last evaluation

    def _build_model_and_strategy(self) -> None:
        """Build the model on the meta device (the strategy shards it, then gives storage to each
        rank's share and initialises it from train.seed, dis_dist/distributed/init.py: the same
        weights at any world size), the diffusions (training's, and the sampler's respaced one)
        and the strategy."""
        cfg = self.cfg
        with torch.device("meta"):
            model = self.spec.build(class_dropout_prob=cfg.model.class_dropout_prob,
                                    drop_path_rate=cfg.model.drop_path_rate, scan_backend=cfg.model.scan_backend)
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.flops_per_image = 3 * self.spec.flops().total  # forward + backward = 3x forward, for MFU
        diff = cfg.diffusion
        self.diffusion = create_diffusion(num_steps=diff.num_steps, schedule=diff.schedule,
                                          learn_sigma=cfg.model.learn_sigma, min_snr_gamma=diff.min_snr_gamma)
        self.sample_diffusion = create_diffusion(cfg.sample.steps, num_steps=diff.num_steps, schedule=diff.schedule,
                                                 learn_sigma=cfg.model.learn_sigma)
        self.strategy = build_strategy(self.env, cfg, model, self.accum, self._make_optimizer, self._make_scheduler)
        self.module: DiS = model  # the DiS itself, whichever wrapper the strategy calls (sharded in place)
        model.set_context_parallel(self.cp_group)
        self.scheduler = self.strategy.scheduler
        self.autocast = torch.autocast(self.env.device.type, torch.bfloat16, enabled=cfg.train.precision == "bf16")

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        return adamw(groups, self.cfg.optim, self.env.device)

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        opt, total = self.cfg.optim, self.cfg.train.steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, warmup=opt.warmup_steps, total=total, schedule=opt.schedule, min_ratio=opt.min_lr / opt.lr))

    def _build_sampling(self) -> None:
        """Choose the sample batch (the planner's inference estimate against half of this rank's
        free memory, now that the training state is allocated, unless sample.batch_size says it)
        and build the evaluator; the grids' sampler is built on first use."""
        cfg = self.cfg
        self.sample_batch = cfg.sample.batch_size or sample_batch_size(
            cfg.model.name, latent=self.loader.image_size, channels=self.loader.channels,
            num_classes=self.num_classes, precision=cfg.train.precision,
            guidance=bool(self.num_classes) and cfg.sample.cfg_scale != 1.0,
            free_bytes=free_memory_bytes(self.env.device, self.env.local_world_size),
        )
        self.grid_sampler: Sampler | None = None
        self.evaluator = (Evaluator(cfg, self.env, self.spec, self.loader.vae, self.loader.scaling_factor,
                                    self.sample_batch) if cfg.eval.every else None)

    # -- checkpoints ------------------------------------------------------------------------
    def model_info(self) -> dict:
        """Return what ``model.json`` records: build_model's arguments, the strategy, and the data and
        diffusion the weights belong to. A checkpoint resumes only a run that agrees on all of it."""
        return {**asdict(self.spec), "strategy": self.strategy.name, "vae": self.loader.vae,
                "scaling_factor": self.loader.scaling_factor, "class_names": list(self.loader.class_names),
                "diffusion": {"num_steps": self.cfg.diffusion.num_steps, "schedule": self.cfg.diffusion.schedule}}

    def save_checkpoint(self) -> Path:
        """Collective. Save the strategy's state and the trainer's beside it (``trainer.json``)."""

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
        """Raise CheckpointMismatch naming every key of ``path``'s model.json that differs from this run."""
        saved = _json_object(path / MODEL_INFO)
        current = json.loads(json.dumps(self.model_info()))  # tuples as lists, as saved
        diffs = [f"{key}: checkpoint {saved.get(key, '(none)')!r}, this run {current.get(key, '(none)')!r}"
                 for key in sorted(current.keys() | saved.keys()) if saved.get(key) != current.get(key)]
        if diffs:
            raise CheckpointMismatch(
                f"checkpoint {str(path)!r} belongs to another model or data than this run ("
                + "; ".join(diffs) + "): use another run_dir, --resume none, or the settings it was trained with"
            )

    def load_checkpoint(self, path: Path) -> None:
        """Collective. Restore everything a checkpoint holds; CheckpointError when it cannot."""
        self.check_model_info(path)
        state = _json_object(path / TRAINER_STATE)
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
        """Collective. Load the checkpoint ``--resume`` names (dis_dist.train.checkpoint.resume_agreed)."""
        return resume_agreed(resume, self.checkpoints, self.env, self.load_checkpoint)

    # -- samples and evaluations ----------------------------------------------------------------
    def sample_grid(self) -> np.ndarray | None:
        """Collective. Draw ``sample.num`` EMA samples from fixed noise and labels (a row per class),
        every rank its share in micro-batches of ``sample.batch_size``; return their uint8 grid on
        rank 0 (None elsewhere)."""
        sc = self.cfg.sample
        if self.grid_sampler is None:
            self.grid_sampler = Sampler(
                self.sample_diffusion, SampleSettings.of(sc),
                display_decoder(self.loader.vae, self.loader.scaling_factor, self.env.device), self.env.device,
                bf16=self.cfg.train.precision == "bf16")
        with self._ema_for_sampling() as (model, collective):
            mine = list(self.grid_sampler.share(model, sc.num, self.sample_batch, rank=self.env.rank,
                                                world_size=self.env.world_size, collective=collective))
        parts = self.env.gather_to_main(mine)
        return None if parts is None else self._grid_of([b for part in parts for b in part])

    def _grid_of(self, batches: list[tuple[list[int], np.ndarray, np.ndarray | None]]) -> np.ndarray:
        """The grid of samples 0..sample.num-1 from (indices, images, labels) batches in any order."""
        sc = self.cfg.sample
        batches = sorted(batches, key=lambda b: b[0][0])
        images = np.concatenate([b[1] for b in batches])
        if not self.num_classes:
            return make_grid(images)
        labels = np.concatenate([b[2] for b in batches])  # sample i is of class i mod classes
        per_class = sc.num // self.num_classes
        return make_grid(images[np.argsort(labels, kind="stable")], ncol=per_class or None)

    @contextmanager
    def _ema_for_sampling(self) -> Iterator[tuple[torch.nn.Module, bool]]:
        """Lend the strategy's EMA model for sampling, each rank with whole sequences: the ranks of a
        context-parallel group draw different samples, as all ranks do."""
        self.module.set_context_parallel(None)
        try:
            with self.strategy.ema_for_sampling() as lent:
                yield lent
        finally:
            self.module.set_context_parallel(self.cp_group)

    def _grid_due(self) -> bool:
        """Whether a sample grid is still to be drawn at this step (every sample.every, and the last step)."""
        sc = self.cfg.sample
        return (sc.num > 0 and self.done.grid_step != self.step
                and (bool(sc.every and self.step % sc.every == 0) or self.step == self.cfg.train.steps))

    def evaluate(self, logger: RunLogger) -> None:
        """Collective. Score eval.num_samples EMA samples; log the metrics (rank 0). When a grid is
        due at this step too, the evaluation keeps its first sample.num images for it: they are
        the grid's samples (the same settings, seed and sample indices), not drawn twice."""
        start = time.perf_counter()
        keep = self.cfg.sample.num if self._grid_due() and self.cfg.eval.num_samples >= self.cfg.sample.num else 0
        with self._ema_for_sampling() as (model, collective):
            metrics = self.evaluator(model, self.sample_diffusion, collective, keep=keep)
        if metrics is None:
            return
        self.metrics = metrics
        logger.scalars(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        logger.flush()
        log.info("eval at step %d (%d samples vs %s, %.0f s): %s", self.step, self.cfg.eval.num_samples,
                 self.cfg.eval.reference, time.perf_counter() - start, format_metrics(metrics))

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

    def _draw_grid(self, logger: RunLogger) -> None:
        self.done.grid_step = self.step  # drawn or failed: not again at this step
        kept = self.evaluator.kept if self.evaluator is not None and self.done.evaluation == self.step else None
        if kept is not None:  # this step's evaluation drew the grid's samples (on every rank, or on none)
            self.evaluator.kept = None
            self.done.grid = self._grid_of(kept) if self.env.is_main else None
        else:
            self.done.grid = self.sample_grid()
        if self.done.grid is not None:
            logger.image("samples/ema", self.step, self.done.grid)
            logger.flush()

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: str = "auto", stop_at_step: int | None = None) -> FitResult:
        """Train from the checkpoint ``resume`` picks up to ``train.steps``; with ``stop_at_step``,
        stop there (saving a checkpoint) as a preempted run would. Holds ``run_dir`` for the run:
        a second job on it is refused (dis_dist/train/run_lock.py)."""
        end_step = min(self.cfg.train.steps, stop_at_step or self.cfg.train.steps)
        start = time.perf_counter()
        with hold_run_dir(self.env, self.run_dir, self.cfg.checkpoint.lock_lease_s) as lease:
            logger = self._begin(resume)
            window = LogWindow(torch.zeros(3, device=self.env.device))
            with StopRequest(self.env, self.run_dir) as stop:
                stop.clear()  # a request left by an earlier job was handled by its save
                while self.step < end_step:
                    result = self.train_step(window)
                    if lease is not None:
                        lease.check()
                    if self.step % self.cfg.log.every == 0 or self.step == end_step:
                        self._log(logger, window, result)
                        window = LogWindow(window.losses.zero_())
                    t_other = time.perf_counter()
                    self._periodic(logger)
                    window.other_s += time.perf_counter() - t_other
                    if stop.poll():
                        self.stopped = stop.reason or "stop requested on another rank"
                        break
                if self.stopped:
                    stop.clear()
            return self._finish(logger, start)

    def _begin(self, resume: str) -> RunLogger:
        """Collective. Resume (``--resume``), record the config, open the logs."""
        cfg, env = self.cfg, self.env
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
        self.strategy.model.train()
        self.done = Done(checkpoint=self.step if ckpt is not None else -1)
        return logger

    def train_step(self, window: LogWindow) -> StepResult:
        """Take one optimiser step: ``accum`` micro-batches' forward and backward passes, the step and
        the EMA update; add their losses to ``window``."""
        env, model = self.env, self.strategy.model
        for micro in range(self.accum):
            t_data = time.perf_counter()
            x, y = next(self.loader)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            window.data_s += time.perf_counter() - t_data
            t, noise = self._randomness(x, micro)
            kwargs = {"y": y} if self.num_classes else {}
            with self.strategy.micro_batch(last=micro == self.accum - 1):
                with self.autocast:
                    terms = self.diffusion.training_losses(model, x, t, kwargs, noise=noise)
                loss = terms["loss"].mean()
                self.strategy.backward(loss)
            window.losses += torch.stack([
                loss.detach(), terms["mse"].detach().mean(),
                terms["vb"].detach().mean() if "vb" in terms else loss.new_zeros(()),
            ]).float() / self.accum
        result = self.strategy.step()
        self.strategy.update_ema(ema_decay_at(self.cfg.train.ema_decay, self.ema_updates, self.cfg.train.ema_warmup))
        self.ema_updates += 1
        self.skipped_steps += int(result.skipped)
        self.step += 1
        self._check_finite(result)
        window.steps += 1
        return result

    def _randomness(self, x: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the timesteps and noise of one micro-batch, and seed the model's own randomness
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

    def _log(self, logger: RunLogger, window: LogWindow, result: StepResult) -> None:
        """Collective. Log the window's mean losses (over every rank), throughput, memory and MFU to
        TensorBoard and the console. Gathering the losses syncs a GPU, once per window."""
        env, n = self.env, window.steps
        mem = torch.tensor([peak_memory_gb(env.device)], device=env.device)
        stats = self._gather_stats(torch.cat([window.losses / n, mem]))
        self.last_loss, mse, vb = stats[:, :3].mean(0).tolist()
        memory = stats[:, 3].tolist()
        elapsed = time.perf_counter() - window.start - window.other_s
        self.images_per_sec = images_per_sec = n * self.cfg.train.global_batch / elapsed
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
            "perf/data_wait_s": window.data_s / n,
            "perf/peak_memory_gb": max(memory),
            **{f"memory/peak_gb_rank{r}": m for r, m in enumerate(memory)},
        }
        device_peak = peak_flops(env.device, self.cfg.train.precision)
        if device_peak:
            scalars["perf/mfu"] = images_per_sec * self.flops_per_image / (device_peak * env.world_size)
        logger.scalars(self.step, scalars)
        logger.progress(self.step, self.last_loss, images_per_sec)

    def _gather_stats(self, values: torch.Tensor) -> torch.Tensor:
        """Gather every rank's ``values`` (k,) into a (world, k) tensor, on every rank."""
        if not self.env.distributed:
            return values[None]
        out = [torch.empty_like(values) for _ in range(self.env.world_size)]
        torch.distributed.all_gather(out, values)
        return torch.stack(out)

    def _periodic(self, logger: RunLogger) -> None:
        """Collective. Do what is due at this step: the checkpoint first (work is never lost to a
        failing grid or evaluation), then the evaluation and the sample grid, guarded (a grid due with
        an evaluation is made of the evaluation's first samples)."""
        cfg = self.cfg
        if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
            self.save_checkpoint()
            self.done.checkpoint = self.step
        if cfg.eval.every and self.step % cfg.eval.every == 0:  # first: it draws a grid due now as well
            self.done.evaluation = self.step
            self._guarded("evaluation", "eval", logger, lambda: self.evaluate(logger))
        if cfg.sample.every and self.step % cfg.sample.every == 0:
            self._guarded("sample grid", "samples", logger, lambda: self._draw_grid(logger))

    def _finish(self, logger: RunLogger, start: float) -> FitResult:
        """Collective. Save the last checkpoint, and at the end of training evaluate and draw the last
        grid (saved as samples.png)."""
        cfg, env = self.cfg, self.env
        if self.done.checkpoint != self.step:
            self.save_checkpoint()
        self.checkpoints.finish()
        if self.stopped and env.is_main:
            log.warning("stopped at step %d (%s) after saving a checkpoint; resume with --resume auto",
                        self.step, self.stopped)
        samples_png = None
        if self.step == cfg.train.steps:
            if self.evaluator is not None and self.done.evaluation != self.step:
                self.done.evaluation = self.step
                self._guarded("evaluation", "eval", logger, lambda: self.evaluate(logger))
            if self.done.grid_step != self.step and cfg.sample.num > 0:
                self._guarded("sample grid", "samples", logger, lambda: self._draw_grid(logger))
            if self.done.grid is not None:
                samples_png = self.run_dir / "samples.png"
                save_png(self.done.grid, samples_png, scale=2)
        logger.close()
        wall = time.perf_counter() - start
        if env.is_main:
            log.info("done: step %d, loss %.4f, %s", self.step, self.last_loss, format_duration(wall))
        return FitResult(self.step, self.last_loss, wall, samples_png, self.images_per_sec, self.stopped,
                         self.metrics)
