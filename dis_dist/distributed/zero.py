"""DeepSpeed ZeRO stage 1, 2 or 3 (``dist.zero_stage``), with a JSON passthrough file for the
engine settings this project does not own (``dist.deepspeed_config``).

The engine owns gradient accumulation, clipping, the optimiser step and the learning-rate
schedule (the trainer's AdamW and schedule are handed to ``deepspeed.initialize``). The EMA is
kept per rank from the fp32 master weights this rank owns: a fragment per parameter, with its
offset in the flattened parameter, updated with no communication and saved beside the engine's
checkpoint as ``ema_rank<r>.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dis_dist.config import RunConfig
from dis_dist.distributed.env import DistEnv
from dis_dist.distributed.init import init_parameters, materialize, on_meta
from dis_dist.distributed.strategy import (
    OptimizerFactory,
    SchedulerFactory,
    StepResult,
    Strategy,
    lerp_ema,
    optimizer_numel,
    param_groups,
    swap_values,
)
from dis_dist.errors import BackendError, CheckpointError, ConfigError
from dis_dist.models.spec import check_weights
from dis_dist.utils.safe_load import load_torch, torch_load_as_data

log = logging.getLogger(__name__)

TAG = "deepspeed"  # the engine's checkpoint sub-directory
# Keys of the generated DeepSpeed config that come from the run config; a passthrough file
# setting them would train differently from what the run config says.
OWNED = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / (train.micro_batch x ranks)",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.*",
    "scheduler": "optim.* (warm-up and schedule)",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "torch_autocast": "train.precision",
}
LOWER_PRECISION_MODULES = ["torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv1d",
                           "torch.nn.modules.conv.Conv2d"]


def deepspeed_config(cfg: RunConfig, accum: int) -> dict[str, Any]:
    """The engine's config: what the run config says, merged with the passthrough file."""
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        # memory_efficient_linear would replace torch.nn.functional.linear for the whole process
        # (DeepSpeed never restores it): every later model in the process would compute differently.
        "zero_optimization": {"stage": cfg.dist.zero_stage, "memory_efficient_linear": False},
        # bf16 as torch autocast over fp32 weights (DeepSpeed's bf16 mode would store every weight
        # in bf16, the scan's A, D and dt bias included); Linear and Conv weights communicate in
        # bf16 (dt_proj is a DeltaProjection, not a Linear, so its bias stays fp32).
        "torch_autocast": {"enabled": cfg.train.precision == "bf16", "dtype": "bfloat16",
                           "lower_precision_safe_modules": LOWER_PRECISION_MODULES},
        "zero_allow_untested_optimizer": True,  # the trainer's torch AdamW
        "steps_per_print": 2**31 - 1,  # the trainer logs
    }
    path = cfg.dist.deepspeed_config
    if not path:
        return ds
    try:
        extra = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"dist.deepspeed_config: cannot read {path!r}: {e}") from None
    for key, owner in OWNED.items():
        if key in extra:
            raise ConfigError(f"dist.deepspeed_config {path!r} sets {key!r}, which comes from {owner}: remove it")
    stage = extra.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != cfg.dist.zero_stage:
        raise ConfigError(
            f"dist.deepspeed_config {path!r} sets zero_optimization.stage={stage}, but "
            f"dist.zero_stage={cfg.dist.zero_stage}: set the stage in one place, dist.zero_stage"
        )
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def import_deepspeed(device: torch.device):  # noqa: ANN201
    """DeepSpeed, configured for this device kind (it picks its accelerator at import)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise BackendError(
            f"dist.strategy='deepspeed' needs DeepSpeed: pip install deepspeed (import failed: {e})"
        ) from None
    return deepspeed


def partition_from_meta(deepspeed, model: nn.Module, device: torch.device, seed: int, ds_config: dict) -> None:  # noqa: ANN001
    """ZeRO-3 from a meta-device model, a unit at a time: each block is materialised whole,
    initialised and partitioned over the ranks (``deepspeed.zero.Init(module=...)``) before the
    next, then the rest (embeddings, final layer). No rank holds more than its partitions and
    one block."""
    blocks = set(getattr(model, "blocks", list)())
    units = [(f"{name}.", module) for name, module in model.named_modules() if module in blocks]
    for prefix, unit in [*units, ("", model)]:
        mine = [(prefix + n, p) for n, p in unit.named_parameters() if p.is_meta]
        for owner in unit.modules():  # storage for the unit's meta parameters, nothing else
            for key, p in list(owner._parameters.items()):
                if p is not None and p.is_meta:
                    setattr(owner, key, nn.Parameter(torch.empty(p.shape, device=device), p.requires_grad))
        named = dict(model.named_parameters())
        init_parameters(model, seed, [(name, named[name]) for name, _ in mine])
        deepspeed.zero.Init(module=unit, config_dict_or_path=ds_config)


def place_fragment(whole: Tensor, start: int, fragment: Tensor) -> None:
    """Copy a rank's ``fragment`` of a flattened parameter into ``whole`` at ``start`` (ZeRO-3
    pads the last partition past the parameter's end: the padding is dropped)."""
    n = max(0, min(fragment.numel(), whole.numel() - start))
    whole[start : start + n] = fragment[:n].to(whole.device)


def share_master_partitions(optimizer: Any) -> None:
    """ZeRO-3 over fp32 weights (this project's bf16 is torch autocast, so its weights are always
    fp32) needs no second fp32 copy of each partition as the master, and DeepSpeed 0.19 means to
    skip it, but its test compares a ``torch.device`` with a device name and never holds: the
    master partitions become the weight partitions themselves (4 bytes per parameter and rank:
    1.8 GB per rank of DiS-H/2 on 2 ranks). The optimiser's step then updates the weights in
    place, and DeepSpeed's copy from master to weights copies a tensor onto itself."""
    for low, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
        if (low is not None and low.dtype == master.dtype and low.device == master.device
                and low.shape == master.shape and low.data_ptr() != master.data_ptr()):
            master.data = low.data


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(
        self, env: DistEnv, cfg: RunConfig, model: nn.Module, accum: int,
        make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory,
    ) -> None:
        super().__init__(env, cfg, accum, model)
        deepspeed = import_deepspeed(env.device)
        deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo")
        self.stage = cfg.dist.zero_stage
        self._names = [n for n, _ in model.named_parameters()]
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        ds_config = deepspeed_config(cfg, accum)
        if self.stage == 3 and on_meta(model):
            partition_from_meta(deepspeed, model, env.device, cfg.train.seed, ds_config)
        else:
            model = materialize(model, env.device, cfg.train.seed).to(env.device)
        optimizer = make_optimizer(param_groups(model, cfg.optim.weight_decay, self._no_decay))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_config,
        )
        self.model = self.engine
        if self.stage == 3:
            share_master_partitions(self.engine.optimizer)
        self._params = [p for _, p in self.engine.module.named_parameters()]
        self._ema = {name: (start, frag.detach().clone().float())
                     for name, (start, frag) in self._fragments().items()}

    def _fragments(self) -> dict[str, tuple[int, Tensor]]:
        """name -> (offset in the flattened parameter, this rank's fp32 master fragment)."""
        from deepspeed.utils import safe_get_local_fp32_param

        out = {}
        for name, p in zip(self._names, self._params):
            if hasattr(p, "ds_id"):  # ZeRO-3: a contiguous partition per rank, the last padded
                frag = safe_get_local_fp32_param(p)
                out[name] = (frag.numel() * self.env.rank, frag)
            elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2: a slice, if any
                out[name] = (p._hp_mapping.lp_fragment_address.start, p._hp_mapping.get_hp_fragment())
        return out

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)  # the engine divides by the accumulation steps
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # counts the micro-batch; the optimiser steps on the boundary

    def step(self) -> StepResult:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm_value = float(norm) if norm is not None else math.nan
        # Outside fp16 the engine steps whatever the norm: a non-finite one is only reported.
        return StepResult(norm_value, not math.isfinite(norm_value))

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        current = self._fragments()
        lerp_ema([self._ema[name][1] for name in current], [frag for _, frag in current.values()], decay)

    @contextmanager
    def ema_for_sampling(self) -> Iterator[tuple[nn.Module, bool]]:
        """ZeRO-3: the partitioned model itself with the EMA partitions swapped in (the weight
        partitions wait in the EMA's place; the parameters DeepSpeed keeps whole, below its
        persistence threshold, are gathered again), so no rank holds the whole EMA. ZeRO-1/2
        hold whole weights anyway: a whole copy."""
        if self.stage != 3:
            yield self.ema_model(all_ranks=True), False
            return
        module = self.engine.module
        training = module.training
        pairs = []
        for name, p in zip(self._names, self._params):
            ema = self._ema[name][1]
            n = min(p.ds_tensor.numel(), ema.numel())  # the last partition is padded
            pairs.append((p.ds_tensor.detach().view(-1)[:n], ema.view(-1)[:n]))
        persistent = [p for p in self._params if getattr(p, "ds_persist", False)]

        @torch.no_grad()
        def swap() -> None:
            swap_values(*zip(*pairs))
            if persistent:  # as DeepSpeed's own optimiser step does: release, then gather anew
                persistent[0].partition(param_list=persistent)
                persistent[0].all_gather(param_list=persistent)

        swap()
        try:
            yield module.eval(), True
        finally:
            swap()
            module.train(training)

    def full_state_dict(self, ema: bool = True) -> dict[str, Tensor] | None:
        fragments = self._ema if ema else self._fragments()
        full = {}
        for name in self._names:
            shape = self._shapes[name]
            whole = torch.zeros(math.prod(shape), device=self.env.device)
            if name in fragments:
                place_fragment(whole, *fragments[name])
            dist.reduce(whole, dst=0)  # fragments of different ranks do not overlap
            if self.env.is_main:
                full[name] = whole.view(shape).cpu()
        return full if self.env.is_main else None

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        torch.save(
            {"world_size": self.env.world_size, "stage": self.stage, "shapes": self._shapes,
             "fragments": {n: (s, t.cpu()) for n, (s, t) in self._ema.items()}},
            directory / f"ema_rank{self.env.rank}.pt",
        )

    def load(self, directory: Path) -> None:
        path = directory / f"ema_rank{self.env.rank}.pt"
        saved = load_torch(path) if path.is_file() else None
        if saved is None or saved["world_size"] != self.env.world_size or saved["stage"] != self.stage:
            raise CheckpointError(
                f"{str(directory)!r} was written by DeepSpeed ZeRO with another world size or stage "
                f"(found {path.name}: {saved and (saved['world_size'], saved['stage'])}); resume it with "
                f"the same number of ranks and dist.zero_stage, or export it (tools/export_checkpoint.py)"
            )
        try:
            with torch_load_as_data():  # the engine's own loads: no code from its files either
                load_path, _ = self.engine.load_checkpoint(
                    str(directory), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        except CheckpointError:
            raise
        except Exception as e:  # what DeepSpeed raises on a damaged file
            raise CheckpointError(f"{directory / TAG} cannot be loaded: {type(e).__name__}: {e}") from None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {str(directory / TAG)!r}")
        for name, (_, tensor) in saved["fragments"].items():
            self._ema[name][1].copy_(tensor)

    @classmethod
    def holds_checkpoint(cls, directory: Path) -> bool:
        return (directory / TAG).is_dir()

    @classmethod
    def read_weights(cls, directory: Path, model: nn.Module, ema: bool = True) -> tuple[dict[str, Tensor], Path]:
        """The EMA from every rank's fragments (``ema_rank<r>.pt``), or the raw weights through
        DeepSpeed's zero_to_fp32 (its loads as data)."""
        if not ema:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with torch_load_as_data():
                return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG), directory / TAG
        parts = [load_torch(f) for f in sorted(directory.glob("ema_rank*.pt"))]
        if not parts or len(parts) != parts[0]["world_size"]:
            raise CheckpointError(f"{str(directory)!r}: expected one ema_rank<r>.pt per rank, found {len(parts)}")
        shapes = parts[0]["shapes"]
        check_weights(model, {name: (shape, "float32") for name, shape in shapes.items()},
                      directory / "ema_rank0.pt")  # before allocating what it says
        full = {name: torch.zeros(math.prod(shape)) for name, shape in shapes.items()}
        for part in parts:
            for name, (start, frag) in part["fragments"].items():
                place_fragment(full[name], start, frag)
        return {name: t.view(shapes[name]) for name, t in full.items()}, directory / TAG

    def local_numel(self) -> dict[str, int]:
        stored = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in self._params]
        params = sum(t.numel() for t in stored)
        # A master partition that shares the weights' storage (DeepSpeed does so where their dtype
        # and device agree) is not counted twice.
        weights = {t.untyped_storage().data_ptr() for t in stored}
        master = sum(frag.numel() for _, frag in self._fragments().values()
                     if frag.untyped_storage().data_ptr() not in weights)
        return {
            "params": params,
            "optimizer": master + optimizer_numel(self.optimizer.optimizer),
            "ema": sum(t.numel() for _, t in self._ema.values()),
        }
