"""Typed run configuration: dataclasses <- YAML file + ``section.key=value`` overrides.

Every key is documented in docs/configuration.md, generated from the fields' comments below by
tools/gen_config_docs.py. Unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the key and the valid choices, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dis_dist.errors import ConfigError

# Every field's description is its inline comment, continued by the comment lines directly below
# it: tools/gen_config_docs.py renders them into docs/configuration.md (the config reference).


@dataclass
class ModelConfig:
    name: str = "DiS-S/2"  # DiS-{T,S,B,M,L,H}/{2,4,8}: size / patch. Width/depth: T 128/4 (ours, for CPU
    # demos and tests), S 368/24, B 768/24, M 768/48, L 1024/48, H 1536/48
    conditional: bool = True  # class-conditional on the data's labels; false: unconditional
    learn_sigma: bool = True  # predict the variance too (2C output channels)
    class_dropout_prob: float = 0.1  # labels replaced by the null class in training (classifier-free guidance)
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly over the blocks to this value
    scan_backend: str = "auto"  # selective-scan backend: auto, cpu, chunked, triton, cuda or reference
    # (docs/kernels.md); $DIS_SCAN_BACKEND overrides auto


@dataclass
class DataConfig:
    source: Literal["fmnist", "shards"] = "fmnist"  # shards: a latent cache (docs/data.md); fmnist:
    # Fashion-MNIST's IDX files, in memory
    root: str = "/usr/share/datasets/fashion-mnist"  # fmnist: the directory of the IDX files (.gz or not)
    split: Literal["train", "test"] = "train"  # fmnist: the split to train on
    url: str = ""  # shards: the cache directory (local path or s3://...), as encode_latents wrote it
    image_size: int = 32  # the spatial size the model sees (Fashion-MNIST is padded 28 -> 32); shards:
    # the cache's latent size (checked)
    random_flip: bool = True  # horizontal flips: the stored flip latent (or a mirrored pixel image)
    num_workers: int = 2  # shards: DataLoader worker processes per rank (0: read in the trainer)
    shuffle_buffer: int = 1000  # shards: samples in each stream's (worker's) shuffle buffer
    cache_dir: str = ""  # shards: local directory caching remote shards
    on_error: Literal["skip", "raise"] = "skip"  # shards: a shard that fails to read or verify is skipped
    # and counted (data/shard_errors in TensorBoard), or (raise) stops the run with an error naming it
    verify: Literal["size", "sha256", "none"] = "size"  # shards: check each shard against the manifest
    # before use: its size (and sample count), its sha256 too, or nothing
    s3_endpoint: str = ""  # shards: S3 endpoint URL (default: $AWS_ENDPOINT_URL)


@dataclass
class DiffusionConfig:
    num_steps: int = 1000  # diffusion steps
    schedule: Literal["linear", "cosine"] = "linear"  # linear (betas 1e-4..0.02) or cosine
    min_snr_gamma: float = 0.0  # > 0: Min-SNR loss weights min(SNR, gamma) / SNR (5 is usual); 0: off, as DiT
    # (Hang et al. 2023: each sample's MSE is weighted so that low-noise steps count less and training
    # converges faster; the VLB term is not weighted)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW learning rate (after warm-up)
    weight_decay: float = 0.0  # AdamW weight decay, on weight matrices only (not biases, norms, A_log, D,
    # pos_embed)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear warm-up steps
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: constant, or cosine (down to
    # optim.min_lr at train.steps)
    min_lr: float = 0.0  # the floor of the cosine schedule
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 400_000  # optimiser steps
    global_batch: int = 256  # images per optimiser step, all ranks together
    micro_batch: int = 256  # images per forward/backward on one rank; accumulation = global batch /
    # (micro-batch x data-parallel ranks)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast, fp32 master weights
    ema_decay: float = 0.9999  # EMA of the weights (the weights samples and evaluations use)
    ema_warmup: bool = False  # decay = min(ema_decay, (1 + n) / (10 + n)) at update n
    seed: int = 0  # seeds the weights (the same on every rank), and each micro-batch's noise, timesteps,
    # label dropout and drop path (from its place in the global batch)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU if one is visible, else the CPU
    activation_checkpointing: int = 0  # recompute every k-th block's activations in backward; 0: off
    # (1: every block; the others store their activations)
    max_skipped_in_a_row: int = 10  # non-finite steps in a row before training stops with an error; 0: never
    # (each one is skipped and counted: train/skipped_steps)


@dataclass
class SampleConfig:
    every: int = 10_000  # steps between EMA sample grids in TensorBoard; 0 disables
    num: int = 40  # images in a grid (TensorBoard's and the end-of-run samples.png); 0: none at the end
    # (needs sample.every=0). One row per class when conditional
    batch_size: int = 0  # samples per forward pass on one rank (x2 with guidance), for grids and
    # evaluations; 0: the planner's inference estimate against half of this rank's free memory (at most 256)
    steps: str = "100"  # respacing of the sampler: "250", "ddim50", "10,20,30", ...
    sampler: Literal["ddpm", "ddim"] = "ddpm"  # ddpm (ancestral) or ddim
    ddim_eta: float = 0.0  # DDIM noise (0: deterministic)
    cfg_scale: float = 1.0  # classifier-free guidance scale; 1 = none
    cfg_channels: Literal["all", "first3"] = "all"  # guide all eps channels, or the first 3 (DiT's convention)
    cfg_interval: list[int] = field(default_factory=lambda: [0, 1000])  # guided model timesteps [lo, hi)
    # (the conditional output alone elsewhere, one forward pass there): guiding the noisiest steps costs
    # diversity (Kynkaanniemi et al. 2024); tools/sample.py --cfg-interval LO HI
    clip_denoised: bool = False  # clip predicted x0 to [-1, 1] (pixel space)
    seed: int = 0  # fixed noise and labels, so grids are comparable across the run


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations of the EMA (and one at the end); 0 disables (docs/evaluation.md)
    num_samples: int = 1000  # samples per evaluation, class-balanced, drawn with the sample.* settings
    # over all ranks
    batch_size: int = 250  # images per forward pass of the feature network (sampling: sample.batch_size)
    features: Literal["inception", "fmnist"] = "inception"  # FID's Inception-v3, or the Fashion-MNIST classifier
    # (inception: FID, sFID, IS, precision/recall; fmnist: Frechet distance in its features, conditional
    # accuracy, precision/recall)
    weights: str = ""  # the network's file (inception default: torch hub cache; fmnist: .cache/fmnist_classifier.pt)
    # ($DIS_INCEPTION_WEIGHTS also names the Inception weights)
    reference: str = ""  # ADM reference .npz, statistics .npz, image folder/shards, or Fashion-MNIST's directory
    # (what the samples are compared with; required when eval.every > 0)
    precision_recall: bool = True  # also improved precision/recall (k-NN against the reference features,
    # k = 3)


@dataclass
class CheckpointConfig:
    every: int = 5000  # steps between checkpoints; 0 saves only at the end (one is always written there)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    async_save: bool = False  # fsdp: write shards in a background thread while training goes on (copied to
    # CPU memory first; the checkpoint is marked complete at the next save or at the end of training)
    lock_lease_s: int = 600  # one job per run_dir: a job's lease on it (run_dir/run.lock, renewed every
    # lock_lease_s/10 s while it trains) lapses this long after its last renewal, and another job may then
    # take it over (a requeued SLURM job takes over its own at once); 0: no lock


@dataclass
class LogConfig:
    every: int = 100  # steps between scalar logs and console lines


@dataclass
class DistConfig:
    strategy: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"  # single (one process), ddp, fsdp
    # (FSDP2) or deepspeed (ZeRO); docs/distributed.md
    timeout_min: float = 30.0  # a collective that waits longer fails with an error instead of hanging
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (ZeRO-3-like); false: ZeRO-2-like
    # (kept from each block's forward to its backward: more memory, less communication)
    shard_group_size: int = 0  # fsdp: ranks sharing one copy of the model; 0: all (FSDP), k: HSDP (k = GPUs per node)
    # (shard over k ranks, replicate across the groups)
    cpu_offload: bool = False  # fsdp: sharded parameters, gradients and optimiser states live in CPU memory
    # (GPU runs; the optimiser step runs there)
    context_parallel: int = 1  # ddp/fsdp: consecutive ranks splitting each sample's tokens (world / this
    # hold different samples): the cp axis of a (dp, cp) mesh; it must divide the world size
    zero_stage: int = 2  # deepspeed: ZeRO stage 1 (optimiser states sharded), 2 (+ gradients), 3 (+ weights)
    deepspeed_config: str = ""  # deepspeed: JSON file merged into the generated config (configs/deepspeed/*.json)
    # (buckets, overlap, ...; keys the run config owns, such as batch sizes, clipping, precision and the
    # stage, are refused there)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"  # where the config, TensorBoard events, checkpoints and samples go
    model: ModelConfig = field(default_factory=ModelConfig)  # the network: size, patch, conditioning
    data: DataConfig = field(default_factory=DataConfig)  # what it trains on: a latent cache or Fashion-MNIST
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # noise schedule and loss weighting
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the learning-rate schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, batch sizes, precision, EMA, seed
    sample: SampleConfig = field(default_factory=SampleConfig)  # the sampler of grids and evaluations
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation of the EMA during training
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # when checkpoints are written and kept
    log: LogConfig = field(default_factory=LogConfig)  # console lines and TensorBoard scalars
    dist: DistConfig = field(default_factory=DistConfig)  # how the model is spread over processes


# -- conversion ------------------------------------------------------------------------------

def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(key), choices, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one YAML value against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{key}: {value!r} is not valid; choose one of: {', '.join(map(str, choices))}"
            )
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: {value} is out of the 64-bit integer range")
        return value
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf  # float(10**400) overflows
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(
                f"unknown config key {path!r}; {_suggest(key, names)}"
                f"valid keys{' under ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(names)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{path}.")
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["train.steps=10", "model.name=DiS-S/2"] -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides, converted and checked (not yet validated against
    the world size: see :func:`validate`)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(path)!r} must be a mapping of sections (train:, model:, ...), "
                f"got a {type(data).__name__}"
            )
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a config saved with :func:`save_config` (or :func:`to_dict`)."""
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Check what the types alone do not, section by section; ConfigError naming the key. The
    checks that depend on the number of ranks run only when ``world_size`` is given (when the
    job starts)."""
    _validate_model_and_data(cfg)
    _validate_train(cfg)
    _validate_optim(cfg)
    _validate_sampling(cfg)
    _validate_eval(cfg)
    _validate_checkpoint_and_log(cfg)
    _validate_dist(cfg, world_size)
    _validate_batch(cfg, world_size)


def _positive(**values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{key.replace('__', '.')} must be positive, got {value}")


def _non_negative(**values: float) -> None:
    for key, value in values.items():
        if value < 0:
            raise ConfigError(f"{key.replace('__', '.')} must be >= 0, got {value}")


def _fraction(**values: float) -> None:
    for key, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key.replace('__', '.')} must be in [0, 1), got {value}")


def _validate_model_and_data(cfg: RunConfig) -> None:
    from dis_dist.models.dis import parse_model_name  # models import config-free modules only

    _, patch = parse_model_name(cfg.model.name)
    if cfg.data.image_size % patch:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not divisible by the patch size {patch} "
            f"of model.name={cfg.model.name!r}"
        )
    _positive(data__image_size=cfg.data.image_size)
    _fraction(model__class_dropout_prob=cfg.model.class_dropout_prob, model__drop_path_rate=cfg.model.drop_path_rate)
    if cfg.data.source == "shards" and not cfg.data.url:
        raise ConfigError("data.source='shards' needs data.url, the directory of the cache")
    if cfg.data.num_workers < 0 or cfg.data.shuffle_buffer < 1:
        raise ConfigError("data.num_workers must be >= 0 and data.shuffle_buffer >= 1")


def _validate_train(cfg: RunConfig) -> None:
    train = cfg.train
    _positive(train__steps=train.steps, train__global_batch=train.global_batch, train__micro_batch=train.micro_batch)
    _non_negative(train__max_skipped_in_a_row=train.max_skipped_in_a_row, train__seed=train.seed)
    _fraction(train__ema_decay=train.ema_decay)
    if train.activation_checkpointing < 0:
        raise ConfigError(f"train.activation_checkpointing must be >= 0, got {train.activation_checkpointing}")


def _validate_optim(cfg: RunConfig) -> None:
    optim = cfg.optim
    _positive(optim__lr=optim.lr)
    _non_negative(optim__warmup_steps=optim.warmup_steps, optim__grad_clip=optim.grad_clip,
                  optim__weight_decay=optim.weight_decay)
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {optim.betas}")


def _validate_sampling(cfg: RunConfig) -> None:
    """The diffusion and the sampler of grids and evaluations."""
    from dis_dist.diffusion.schedule import space_timesteps

    sample = cfg.sample
    _positive(diffusion__num_steps=cfg.diffusion.num_steps)
    _non_negative(sample__every=sample.every, sample__ddim_eta=sample.ddim_eta, sample__seed=sample.seed,
                  sample__batch_size=sample.batch_size)
    if len(sample.cfg_interval) != 2 or not 0 <= sample.cfg_interval[0] < sample.cfg_interval[1]:
        raise ConfigError(f"sample.cfg_interval must be [lo, hi] timesteps, 0 <= lo < hi, got {sample.cfg_interval}")
    if cfg.diffusion.min_snr_gamma < 0:
        raise ConfigError(f"diffusion.min_snr_gamma must be >= 0, got {cfg.diffusion.min_snr_gamma}")
    if sample.num <= 0 and sample.every > 0:
        raise ConfigError(f"sample.num must be positive when sample.every > 0, got {sample.num}")
    if len(space_timesteps(cfg.diffusion.num_steps, sample.steps)) < 2:  # ConfigError if impossible
        raise ConfigError(f"sample.steps={sample.steps!r}: the sampler needs at least 2 steps")


def _validate_eval(cfg: RunConfig) -> None:
    ev = cfg.eval
    if ev.every < 0 or ev.num_samples < 2 or ev.batch_size < 1:
        raise ConfigError("eval.every must be >= 0, eval.num_samples >= 2 and eval.batch_size >= 1")
    if ev.every and not ev.reference:
        raise ConfigError("eval.every > 0 needs eval.reference: the images (or statistics) to compare samples with")


def _validate_checkpoint_and_log(cfg: RunConfig) -> None:
    ckpt = cfg.checkpoint
    _positive(log__every=cfg.log.every, checkpoint__keep_last=ckpt.keep_last)
    _non_negative(checkpoint__every=ckpt.every, checkpoint__keep_every=ckpt.keep_every,
                  checkpoint__lock_lease_s=ckpt.lock_lease_s)
    if ckpt.async_save and cfg.dist.strategy != "fsdp":
        raise ConfigError(f"checkpoint.async_save needs dist.strategy='fsdp' (got {cfg.dist.strategy!r})")


def _validate_dist(cfg: RunConfig, world_size: int | None) -> None:
    dist = cfg.dist
    if dist.timeout_min <= 0:
        raise ConfigError(f"dist.timeout_min must be positive, got {dist.timeout_min}")
    if dist.zero_stage not in (1, 2, 3):
        raise ConfigError(f"dist.zero_stage must be 1, 2 or 3, got {dist.zero_stage}")
    if dist.shard_group_size < 0:
        raise ConfigError(f"dist.shard_group_size must be >= 0, got {dist.shard_group_size}")
    if world_size is not None and dist.shard_group_size and world_size % dist.shard_group_size:
        raise ConfigError(
            f"dist.shard_group_size={dist.shard_group_size} must be 0 (shard over all ranks) or divide "
            f"the world size {world_size}"
        )
    cp = dist.context_parallel
    if cp < 1:
        raise ConfigError(f"dist.context_parallel must be >= 1, got {cp}")
    if cp > 1 and dist.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"dist.context_parallel={cp} needs dist.strategy 'fsdp' or 'ddp' (got {dist.strategy!r})")
    if world_size is not None and world_size % cp:
        raise ConfigError(f"dist.context_parallel={cp} must divide the world size {world_size}")
    if dist.strategy == "single" and (world_size or 1) > 1:
        raise ConfigError(
            f"dist.strategy='single' runs one process, but the job has {world_size} ranks; "
            f"choose one of: ddp, fsdp, deepspeed"
        )
    if dist.deepspeed_config and not Path(dist.deepspeed_config).is_file():
        raise ConfigError(f"dist.deepspeed_config: {dist.deepspeed_config!r} does not exist")


def _validate_batch(cfg: RunConfig, world_size: int | None) -> None:
    """The global batch splits into micro-batches over the data-parallel ranks."""
    cp = cfg.dist.context_parallel
    data_parallel = (world_size or cp) // cp  # ranks unknown: the micro-batch at least
    per_step = cfg.train.micro_batch * data_parallel
    if cfg.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by train.micro_batch x "
            f"data-parallel ranks (world size / dist.context_parallel) = {cfg.train.micro_batch} x {data_parallel}; "
            f"pick a global batch that is a multiple of {per_step}"
        )


def grad_accumulation(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per optimiser step on each rank (the ranks of a context-parallel group
    share theirs)."""
    return cfg.train.global_batch // (cfg.train.micro_batch * (world_size // cfg.dist.context_parallel))
