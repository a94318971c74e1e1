"""FSDP2 (``fully_shard``): each DiS block, then the root, sharded over the ranks (or, with
``dist.shard_group_size``, over groups of ranks replicated across the others: HSDP). Under bf16
the blocks are gathered in bf16, except each mixer's two scan-direction modules (their own
units, about a tenth of a block's parameters), which stay fp32 with the root (embeddings and
final layer), so that the scan's A, D and dt bias are never rounded to bf16.

The EMA is a list of DTensors sharded exactly like the parameters and updated shard by shard,
with no communication. Checkpoints go through ``torch.distributed.checkpoint`` (each rank
writes its shards; loading reshards, so a run may resume at another world size).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from dis_dist.config import RunConfig
from dis_dist.distributed.env import DistEnv
from dis_dist.distributed.init import materialize, on_meta
from dis_dist.distributed.strategy import (
    OptimizerFactory,
    SchedulerFactory,
    StepResult,
    Strategy,
    lerp_ema,
    local_tensor,
    optimizer_numel,
    param_groups,
    swap_values,
)
from dis_dist.errors import CheckpointError, ConfigError
from dis_dist.models.spec import check_weights
from dis_dist.utils.safe_load import DataOnlyPlanner, DataOnlyReader

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
# Every Linear on a 3-D input returns a view; FSDP2 warns in case it is modified in place,
# which DiS never does.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def device_mesh(env: DistEnv, shard_group_size: int) -> DeviceMesh:
    """1-D over all ranks (FSDP), or (replicas, shard group) for HSDP."""
    kind = env.device.type
    if shard_group_size in (0, env.world_size):
        return init_device_mesh(kind, (env.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        kind, (env.world_size // shard_group_size, shard_group_size), mesh_dim_names=("replicate", "shard")
    )


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(
        self, env: DistEnv, cfg: RunConfig, model: nn.Module, accum: int,
        make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory,
    ) -> None:
        super().__init__(env, cfg, accum, model)
        dc = cfg.dist
        if dc.cpu_offload and env.device.type != "cuda":
            raise ConfigError("dist.cpu_offload keeps GPU training state in CPU memory; this run has no GPU: "
                              "set dist.cpu_offload=false")
        self.mesh = device_mesh(env, dc.shard_group_size)
        bf16 = cfg.train.precision == "bf16"
        offload = CPUOffloadPolicy() if dc.cpu_offload else OffloadPolicy()
        meta = on_meta(model)  # sharded first, then each rank materialises its own shards
        if not dc.cpu_offload and not meta:
            model = model.to(env.device)

        # bf16 gathers only the blocks' big Linear weights and norms; every unit keeps its inputs
        # as they come (autocast sets the compute dtype): the fp32 residual stream is not rounded
        # on entry to a block, nor are timesteps before the sinusoidal embedding.
        full = MixedPrecisionPolicy(cast_forward_inputs=False)
        low = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False) if bf16 else full
        shard = dict(mesh=self.mesh, reshard_after_forward=dc.reshard_after_forward, offload_policy=offload)
        for block in model.blocks():
            if bf16:  # each scan direction's own unit, gathered in fp32: A, D and the dt bias are
                for branch in (block.mixer.fwd, block.mixer.bwd):  # never rounded to bf16
                    fully_shard(branch, mp_policy=full, **shard)
            fully_shard(block, mp_policy=low, **shard)
        fully_shard(model, mp_policy=full, **shard)  # the root: embeddings and final layer, in fp32
        if meta:
            materialize(model, torch.device("cpu") if dc.cpu_offload else env.device, cfg.train.seed)
        self.model: FSDPModule = model  # type: ignore[assignment]
        self._names = [n for n, _ in model.named_parameters()]
        self._ema = [p.detach().clone() for p in model.parameters()]  # DTensors, sharded alike
        self.optimizer = make_optimizer(param_groups(model, cfg.optim.weight_decay, self._no_decay))
        self.scheduler = make_scheduler(self.optimizer)
        self._async_group: dist.ProcessGroup | None = None

    @contextmanager
    def _gradient_sync(self, enabled: bool):  # noqa: ANN202
        self.model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return self._gradient_sync(last)

    def step(self) -> StepResult:
        return self._clip_and_step(p for p in self.model.parameters() if p.grad is not None)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        lerp_ema([local_tensor(e) for e in self._ema], [local_tensor(p.detach()) for p in self.model.parameters()],
                 decay)

    @contextmanager
    def ema_for_sampling(self) -> Iterator[tuple[nn.Module, bool]]:
        """The sharded model itself with the EMA shards swapped in (the weight shards wait in the
        EMA's place): no rank ever holds the whole EMA, nor a second copy of its shards."""
        self._reshard()  # FSDP keeps the root gathered after a forward pass: the shards, here
        shards = ([local_tensor(p.detach()) for p in self.model.parameters()], [local_tensor(e) for e in self._ema])
        training = self.model.training
        swap_values(*shards)
        try:
            yield self.model.eval(), True
        finally:
            self._reshard()  # no gathered EMA weights left for training's next forward pass
            swap_values(*shards)
            self.model.train(training)

    def _reshard(self) -> None:
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _ema_state(self) -> dict[str, Tensor]:
        return dict(zip(self._names, self._ema))

    def full_state_dict(self, ema: bool = True) -> dict[str, Tensor] | None:
        source = self._ema if ema else [p.detach() for p in self.model.parameters()]
        full = {}
        for name, tensor in zip(self._names, source):
            whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if self.env.is_main:
                full[name] = whole.float().cpu()
        return full if self.env.is_main else None

    def save(self, directory: Path) -> Future | None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "ema": self._ema_state()}
        if not self.cfg.checkpoint.async_save:
            dcp.save(state, checkpoint_id=directory / DCP_DIR)
            return None
        if self._async_group is None:  # its own group: the writer thread's collectives never
            self._async_group = dist.new_group(backend="gloo")  # interleave with training's
        # Staging copies the shards to CPU memory before returning; the thread writes them.
        return dcp.async_save(state, checkpoint_id=directory / DCP_DIR, process_group=self._async_group)

    def load(self, directory: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "ema": self._ema_state()}
        path = directory / DCP_DIR
        try:  # in place, resharded to this mesh; DCP raises on every rank when one fails
            dcp.load(state, storage_reader=DataOnlyReader(str(path)), planner=DataOnlyPlanner())
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        except CheckpointError:
            raise
        except Exception as e:  # DCP's CheckpointException carries each failing rank's error
            raise CheckpointError(f"{path} cannot be loaded: {type(e).__name__}: {str(e)[:500]}") from None

    @classmethod
    def holds_checkpoint(cls, directory: Path) -> bool:
        return (directory / DCP_DIR).is_dir()

    @classmethod
    def read_weights(cls, directory: Path, model: nn.Module, ema: bool = True) -> tuple[dict[str, Tensor], Path]:
        source, prefix = directory / DCP_DIR, "ema" if ema else "model"
        reader = DataOnlyReader(str(source))
        meta = reader.read_metadata().state_dict_metadata
        tensors = {key: m for key, m in meta.items() if key.startswith(prefix + ".") and hasattr(m, "size")}
        check_weights(model, {k[len(prefix) + 1 :]: (tuple(m.size), str(m.properties.dtype).removeprefix("torch."))
                              for k, m in tensors.items()}, source)  # before allocating what it says
        state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in tensors.items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=DataOnlyPlanner(), no_dist=True)
        return {key[len(prefix) + 1 :]: value for key, value in state.items()}, source

    def local_numel(self) -> dict[str, int]:
        return {
            "params": sum(local_tensor(p).numel() for p in self.model.parameters()),
            "optimizer": optimizer_numel(self.optimizer),
            "ema": sum(local_tensor(e).numel() for e in self._ema),
        }
