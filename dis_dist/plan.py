"""Memory planner: per-GPU memory of a DiS run for every strategy, and a recommended setting.

    python -m dis_dist.plan --model DiS-H/2 --resolution 256 --gpus 64 --gpu-mem 80 --global-batch 1024

Model states, per parameter (P parameters, S ranks sharing one copy of the model):

    strategy          weights        gradients   optimiser (master + Adam m, v)   EMA (fp32)
    ddp               4              4           8                                4
    fsdp / hsdp       4/S            4/S         8/S                              4/S
    zero1             4              4           (4 + 8)/S                        4/S
    zero2             4              4/S         (4 + 8)/S                        4/S
    zero3             4/S            4/S         8/S (the weights are the master)  4/S

FSDP keeps fp32 sharded weights (they are the master copy) and gathers bf16 copies block by
block: two blocks at a time (one prefetched), and with ``reshard_after_forward=false`` the whole
model from forward to backward. DeepSpeed runs bf16 as torch autocast over fp32 weights (its
``torch_autocast`` mode, so the scan's parameters stay fp32) beside fp32 master partitions;
Linear and Conv weights travel in bf16 (gradient buckets, ZeRO-3's gathers). HSDP shards over
the GPUs of a node (S = GPUs per node).

Activations per sample are ``ACT_BYTES * tokens * width`` per block, a coefficient measured from
this implementation's autograd graph (tests/test_plan.py re-measures it on small models); with
activation checkpointing each block keeps only ``ACT_CKPT_BYTES * tokens * width`` and one block
is recomputed at a time. Context parallelism (``dist.context_parallel=k``) splits each sample's
tokens over k GPUs: a GPU keeps the activations of ``ceil(tokens / k)`` tokens, the inputs of its
recomputed log-decays and corrections (``ACT_BYTES_CP_EXTRA``), and per block the gathered scan
states and conv halo of the k slices (``cp_buffer_bytes``; recomputed, one block at a time, under
checkpointing). Model states are sharded as
without it (FSDP over all GPUs); DeepSpeed does not support it. A fixed reserve covers the CUDA
context, communication buffers and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from torch import nn

from dis_dist.errors import ConfigError
from dis_dist.models.dis import parse_model_name
from dis_dist.models.flops import count_parameters
from dis_dist.utils.cli import cli_main, number

GB = 1e9
# Bytes kept for backward per (token x width) per block, per sample (measured: tests/test_plan.py).
# bf16 autocast saves little: the elementwise chain of the mixer stays fp32 and the layers keep
# bf16 copies of their inputs beside it.
ACT_BYTES = {"bf16": 160.0, "fp32": 158.0}
ACT_CKPT_BYTES = {"bf16": 8.0, "fp32": 8.5}  # a checkpointed block's inputs and its long skip
# Peak bytes of live tensors per image in a no-grad forward, per (token x width): one block's
# working set (the scan's) dominates, the long skips add little (measured: tests/test_plan.py).
# bf16 autocast also caches a bf16 copy of the weights for the forward: 2 bytes per parameter.
INFER_BYTES = {"bf16": 180.0, "fp32": 256.0}
# Context parallelism: what a rank's mixer keeps beyond the unsplit one's per (token x width) per
# block, the scan steps its log-decays and corrections recompute from (measured: tests/test_plan.py).
ACT_BYTES_CP_EXTRA = {"bf16": 10.0, "fp32": 18.0}
CP_COMM = 0.03  # relative step time per extra GPU in a context-parallel group (heuristic)
D_STATE, D_CONV, EXPAND = 16, 4, 2  # the Mamba mixer's defaults (dis_dist/models/dis.py)
RESERVE_GB = 2.0  # CUDA context, NCCL buffers, workspace
FRAGMENTATION = 1.10  # allocator slack over the sum of live tensors
# CPU ranks (--cpu): a process's own resident memory (Python, torch, gloo, the data loader) and
# the host allocator's slack (measured: tools/bench_scale.py).
HOST_BASELINE_GB = 0.45
HOST_FRAGMENTATION = 1.05
# DeepSpeed's buckets (elements), allocated in the training dtype: its defaults for stages 1-2;
# for stage 3, configs/deepspeed/zero3.json's reduce bucket (2e8), twice (the reduce-scatter
# flattens a copy of it: measured, tools/bench_scale.py), and its prefetch bucket (5e7).
ZERO_BUCKETS = {1: 5e8, 2: 2 * 5e8, 3: 2 * 2e8 + 5e7}
# ZeRO-3 steps AdamW a sub-group of its partition at a time (DeepSpeed's sub_group_size, 1e9
# elements by default); AdamW's temporaries are two fp32 copies of the sub-group.
ZERO3_SUB_GROUP = 1e9
# ZeRO-3 keeps gathered up to this many parameters beyond the blocks in use: those it prefetches
# and those it will use again soon (configs/deepspeed/zero3.json's stage3_max_live_parameters and
# stage3_max_reuse_distance). DeepSpeed's defaults (1e9) kept nearly all of DiS-H/2 gathered on
# every rank after the first step: 3.6 GB more in fp32 (measured, tools/bench_scale.py).
ZERO3_LIVE = 1e8


@dataclass(frozen=True)
class Setting:
    name: str  # as shown in the table
    strategy: str  # dist.strategy
    overrides: tuple[str, ...]  # the config keys that select it
    comm_factor: float  # relative step time from communication (heuristic, see recommend)


SETTINGS = (
    Setting("ddp", "ddp", (), 1.00),
    Setting("zero1", "deepspeed", ("dist.zero_stage=1",), 1.00),
    Setting("zero2", "deepspeed", ("dist.zero_stage=2",), 1.00),
    Setting("fsdp-zero2", "fsdp", ("dist.reshard_after_forward=false",), 1.02),
    Setting("hsdp", "fsdp", ("dist.shard_group_size=<gpus per node>",), 1.03),
    Setting("fsdp", "fsdp", (), 1.06),
    Setting("zero3", "deepspeed", ("dist.zero_stage=3",), 1.08),
)


@dataclass(frozen=True)
class Estimate:
    setting: Setting
    weights: float  # bytes per GPU
    grads: float
    optimizer: float
    ema: float
    transient: float  # gathered weights and gradient buckets
    act_per_sample: float
    act_per_sample_ckpt: float
    act_block: float  # one block's activations per sample (recomputed under checkpointing)
    context_parallel: int = 1  # GPUs sharing each sample's tokens (act_* are per GPU)

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ema

    def total(self, micro_batch: int, checkpointing: bool, host: bool = False) -> float:
        """Peak bytes per GPU, or with ``host`` per CPU rank (its resident memory)."""
        act = self.act_per_sample_ckpt + self.act_block if checkpointing else self.act_per_sample
        live = self.states + self.transient + micro_batch * act
        if host:
            return live * HOST_FRAGMENTATION + HOST_BASELINE_GB * GB
        return live * FRAGMENTATION + RESERVE_GB * GB


def cp_buffer_bytes(width: int, k: int) -> float:
    """Per block and sample, what a rank of a context-parallel group of k keeps of the exchanges:
    (state, log-decay) of both directions gathered from the k slices, and the incoming states
    composed from them (counted as much again), and the conv halos (fp32)."""
    d_inner = EXPAND * width
    return 2 * k * 2 * 2 * d_inner * D_STATE * 4 + k * 2 * d_inner * (D_CONV - 1) * 4


def estimate(
    model: str, *, latent: int, channels: int = 4, num_classes: int = 1000, gpus: int,
    gpus_per_node: int = 8, precision: str = "bf16", zero_buckets: dict[int, float] | None = None,
    zero3_sub_group: float = ZERO3_SUB_GROUP, zero3_live: float = ZERO3_LIVE, context_parallel: int = 1,
) -> list[Estimate]:
    """Per-GPU memory of every setting in SETTINGS for ``model`` on ``latent`` x ``latent`` inputs
    (``zero_buckets``, ``zero3_sub_group``, ``zero3_live``: DeepSpeed's settings, when not this module's),
    each sample's tokens split over ``context_parallel`` GPUs (DeepSpeed's settings left out when > 1)."""
    k = context_parallel
    if k < 1:
        raise ConfigError(f"context parallelism must be at least 1, got {k}")
    zero_buckets = {**ZERO_BUCKETS, **(zero_buckets or {})}
    size, patch = parse_model_name(model)
    params = count_parameters(model, input_size=latent, in_channels=channels, num_classes=num_classes)
    tokens = (latent // patch) ** 2 + (2 if num_classes else 1)
    blocks = size.depth + 1
    block_params = params / blocks  # the gathered unit of FSDP and ZeRO-3 (embeddings are small)
    lp = 2 if precision == "bf16" else 4
    local = -(-tokens // k)  # this GPU's slice of each sample's tokens
    act_block = ACT_BYTES[precision] * local * size.width
    if k > 1:
        act_block += ACT_BYTES_CP_EXTRA[precision] * local * size.width + cp_buffer_bytes(size.width, k)
    act = act_block * blocks
    act_ckpt = ACT_CKPT_BYTES[precision] * local * size.width * blocks
    out = []
    for s in SETTINGS:
        if k > 1 and s.strategy == "deepspeed":
            continue
        shards = min(gpus, gpus_per_node) if s.name == "hsdp" else gpus
        P = params
        if s.name == "ddp":
            w, g, o, e, tr = 4 * P, 4 * P, 8 * P, 4 * P, 2 * 25e6 * 4  # two 25 MB gradient buckets
        elif s.strategy == "fsdp":
            w, g, o, e = 4 * P / shards, 4 * P / shards, 8 * P / shards, 4 * P / shards
            gathered = lp * P if s.name == "fsdp-zero2" else 2 * lp * block_params
            tr = gathered + 4 * block_params  # + one block's unsharded fp32 gradient
        else:
            stage = int(s.name[-1])
            w = 4 * P / (shards if stage == 3 else 1)
            g = 4 * P / (shards if stage >= 2 else 1)
            # Adam, and an fp32 master partition, except under ZeRO-3, whose fp32 weight partitions
            # are the master (dis_dist/distributed/zero.py: share_master_partitions).
            o, e = (8 * P + (0 if stage == 3 else 4 * P)) / shards, 4 * P / shards
            tr = zero_buckets[stage] * lp
            if stage == 3:  # two gathered blocks and the live ones, AdamW's temporaries of a sub-group
                tr += lp * (2 * block_params + min(zero3_live, P)) + 2 * 4 * min(zero3_sub_group, P / shards)
        out.append(Estimate(s, w, g, o, e, tr, act, act_ckpt, act_block, k))
    return out


def inference_bytes_per_image(model: str, *, latent: int, num_classes: int = 1000, precision: str = "bf16") -> float:
    """Peak activation bytes of one image in a sampling forward pass (no autograd graph)."""
    size, patch = parse_model_name(model)
    tokens = (latent // patch) ** 2 + (2 if num_classes else 1)
    return INFER_BYTES[precision] * tokens * size.width


def sample_batch_size(model: str, *, latent: int, channels: int, num_classes: int, precision: str,
                      guidance: bool, free_bytes: float, fraction: float = 0.5, cap: int = 256) -> int:
    """The sampling micro-batch (images per forward pass, before guidance doubles it) whose
    activations take at most ``fraction`` of ``free_bytes``: at least 1, at most ``cap``."""
    per_image = inference_bytes_per_image(model, latent=latent, num_classes=num_classes, precision=precision)
    if precision == "bf16":  # autocast's bf16 copy of the weights
        free_bytes -= 2 * count_parameters(model, input_size=latent, in_channels=channels, num_classes=num_classes)
    fits = int(fraction * free_bytes / (per_image * (2 if guidance else 1)))
    return max(1, min(cap, fits))


def peak_inference_bytes(model: nn.Module, batch: int, precision: str = "fp32") -> int:
    """Peak bytes of the tensors alive at once during one no-grad forward of ``model`` (a DiS),
    parameters and inputs excluded: what INFER_BYTES models. Every tensor an operator returns is
    counted from its creation until its last Python reference is gone (storages counted once)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    device = next(model.parameters()).device
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.linspace(1, 999, batch, device=device)
    y = torch.arange(batch, device=device) % max(1, model.num_classes) if model.num_classes else None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    refs: dict[int, int] = {}
    sizes: dict[int, int] = {}
    live = [0, 0]  # now, peak

    def release(key: int) -> None:
        refs[key] -= 1
        if not refs[key]:
            del refs[key]
            live[0] -= sizes.pop(key)

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                key = tensor.untyped_storage().data_ptr()
                if key in params or not key:
                    continue
                if key not in refs:
                    refs[key], sizes[key] = 0, tensor.untyped_storage().nbytes()
                    live[0] += sizes[key]
                    live[1] = max(live)
                refs[key] += 1
                weakref.finalize(tensor, release, key)
            return out

    with torch.no_grad(), Track():
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            model(x, t, y)
    return live[1]


def saved_activation_bytes(model: nn.Module, batch: int, precision: str = "bf16") -> int:
    """Bytes that one forward of ``model`` (a DiS, on its device) keeps for its backward pass,
    each storage counted once, parameters excluded: what ACT_BYTES models."""
    device = next(model.parameters()).device
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.linspace(1, 999, batch, device=device)
    y = torch.arange(batch, device=device) % max(1, model.num_classes) if model.num_classes else None
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        # Detached: an op's own output saved as itself would hold its grad_fn, which holds it, a
        # cycle Python's collector cannot see: every call leaked the whole graph (2 GB for DiS-S/2
        # at 1026 tokens), which took the test process to 16 GB.
        return tensor.detach()

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            model(x, t, y)
    return sum(n for ptr, n in kept.items() if ptr not in params)


@dataclass(frozen=True)
class Choice:
    estimate: Estimate
    micro_batch: int
    accumulation: int
    checkpointing: bool
    memory: float
    score: float  # relative step time (lower is better)


def choices(estimates: list[Estimate], per_gpu_batch: int, gpu_mem_gb: float, host: bool = False) -> list[Choice]:
    """For each setting and checkpointing on/off, the largest micro-batch (a divisor of the
    per-GPU batch) that fits, ranked by a step-time heuristic: checkpointing costs a third more
    compute, micro-batches under 8 samples' worth of tokens per GPU use a GPU poorly (a GPU of a
    context-parallel group of k holds 1/k of each sample's tokens), and sharding and context
    parallelism cost communication (Setting.comm_factor, CP_COMM)."""
    found = []
    divisors = [d for d in range(per_gpu_batch, 0, -1) if per_gpu_batch % d == 0]
    for est in estimates:
        k = est.context_parallel
        comm = est.setting.comm_factor * (1 + CP_COMM * (k - 1))
        for ckpt in (False, True):
            for m in divisors:
                mem = est.total(m, ckpt, host)
                if mem <= gpu_mem_gb * GB:
                    score = (4 / 3 if ckpt else 1.0) * comm * (1 + max(0, 8 - m / k) * 0.04)
                    found.append(Choice(est, m, per_gpu_batch // m, ckpt, mem, score))
                    break
    return sorted(found, key=lambda c: (c.score, c.memory))


def table(model: str, resolution: int, gpus: int, gpu_mem: float, global_batch: int,
          gpus_per_node: int = 8, precision: str = "bf16", num_classes: int = 1000, host: bool = False,
          context_parallel: int = 1) -> str:
    """The planner's report as text: a row per setting, then the recommendation. With
    ``context_parallel`` 0, a table for each k of 1, 2, 4, 8 that fits a node and divides the GPUs,
    and the recommendation across them."""
    if resolution % 8:
        raise ConfigError(f"--resolution {resolution} is not a multiple of the VAE's factor 8")
    ks = _context_parallel_sizes(gpus, global_batch, gpus_per_node, context_parallel)
    latent = resolution // 8
    lines: list[str] = []
    ranked: list[Choice] = []
    for k in ks:
        ests = estimate(model, latent=latent, num_classes=num_classes, gpus=gpus,
                        gpus_per_node=gpus_per_node, precision=precision, context_parallel=k)
        found = choices(ests, global_batch // (gpus // k), gpu_mem, host)
        ranked += found
        lines += [*([""] if lines else []),
                  *_settings_table(model, resolution, gpus, gpu_mem, global_batch, precision, num_classes, host,
                                   k, ests, found)]
    if not ranked:
        lines.append(f"\nnothing fits in {gpu_mem:g} GB with a micro-batch of 1: use more GPUs"
                     + ("" if context_parallel == 1 else " or more context parallelism"))
        return "\n".join(lines)
    return "\n".join([*lines, "", *_recommendation(min(ranked, key=lambda c: (c.score, c.memory)), ks, gpus,
                                                    gpus_per_node)])


def _context_parallel_sizes(gpus: int, global_batch: int, gpus_per_node: int, context_parallel: int) -> list[int]:
    """The context-parallel sizes k to plan for: the one asked for, or (0) each of 1, 2, 4, 8 that
    fits a node and divides the GPUs and the batch; ConfigError when the GPUs or the batch do not
    divide."""
    if context_parallel < 0:
        raise ConfigError(f"--context-parallel {context_parallel} is negative (0: let the planner choose)")
    if context_parallel:
        ks = [context_parallel]
    else:
        ks = [k for k in (1, 2, 4, 8) if k <= gpus_per_node and gpus % k == 0 and global_batch % (gpus // k) == 0]
        ks = ks or [1]  # none: report k = 1's error
    for k in ks:
        if gpus % k:
            raise ConfigError(f"--gpus {gpus} is not divisible by --context-parallel {k}")
        if global_batch % (gpus // k):
            raise ConfigError(f"--global-batch {global_batch} is not divisible by --gpus {gpus}"
                              + (f" / --context-parallel {k} = {gpus // k}" if k > 1 else ""))
    return ks


def _settings_table(model: str, resolution: int, gpus: int, gpu_mem: float, global_batch: int, precision: str,
                    num_classes: int, host: bool, k: int, ests: list[Estimate], found: list[Choice]) -> list[str]:
    """The lines of one context-parallel size's table: its heading, a row per setting."""
    latent = resolution // 8
    params = count_parameters(model, input_size=latent, in_channels=4, num_classes=num_classes)
    tokens = (latent // parse_model_name(model)[1]) ** 2 + (2 if num_classes else 1)
    unit = "rank" if host else "GPU"
    per_gpu = global_batch // (gpus // k)
    best = {(c.estimate.setting.name, c.checkpointing): c for c in reversed(found)}

    def fit(c: Choice | None) -> str:
        return f"{c.micro_batch} ({c.memory / GB:.1f} GB)" if c else "does not fit"

    cp = f", context parallel {k} ({-(-tokens // k)} of {tokens} tokens per {unit})" if k > 1 else ""
    lines = [
        f"{model} ({params / 1e6:.0f}M parameters) at {resolution} px ({latent}x{latent}x4 latents), "
        f"{precision}, {gpus} {'CPU ranks' if host else 'GPUs'} x {gpu_mem:g} GB, global batch {global_batch} "
        f"({per_gpu} per {unit}){cp}",
        "",
        f"{'setting':<11} {'weights':>8} {'grads':>7} {'optim':>7} {'EMA':>6} {'buffers':>8} "
        f"{'act/img':>8} {'act/img ckpt':>12} {'micro (no ckpt)':>16} {'micro (ckpt)':>13}",
        "-" * 104,
    ]
    for e in ests:
        n = e.setting.name
        lines.append(
            f"{n:<11} {e.weights / GB:>8.2f} {e.grads / GB:>7.2f} {e.optimizer / GB:>7.2f} {e.ema / GB:>6.2f} "
            f"{e.transient / GB:>8.2f} {e.act_per_sample / GB:>8.2f} "
            f"{(e.act_per_sample_ckpt + e.act_block) / GB:>12.3f} {fit(best.get((n, False))):>16} "
            f"{fit(best.get((n, True))):>13}"
        )
    lines.append("(GB per GPU; micro: the largest micro-batch dividing the per-GPU batch that fits, "
                 "and the estimated peak)")
    if k > 1:
        lines += [f"(act/img: a GPU's 1/{k} of each sample's tokens, with the context-parallel buffers)",
                  "(zero1, zero2, zero3 left out: DeepSpeed has no context parallelism)"]
    return lines


def _recommendation(c: Choice, ks: list[int], gpus: int, gpus_per_node: int) -> list[str]:
    """The chosen setting in words, and the config overrides that select it."""
    k = c.estimate.context_parallel
    keys = [f"dist.strategy={c.estimate.setting.strategy}", *c.estimate.setting.overrides,
            *([f"dist.context_parallel={k}"] if k > 1 else []),
            f"train.micro_batch={c.micro_batch}", f"train.activation_checkpointing={int(c.checkpointing)}"]
    keys = [key.replace("<gpus per node>", str(min(gpus, gpus_per_node))) for key in keys]
    over = f" (over context parallel {', '.join(map(str, ks))})" if len(ks) > 1 else ""
    return [f"recommended{over}: {c.estimate.setting.name}" + (f", context parallel {k}" if k > 1 else "")
            + f", micro-batch {c.micro_batch} x {c.accumulation} accumulation, activation checkpointing "
            f"{'on' if c.checkpointing else 'off'}, about {c.memory / GB:.1f} GB per GPU", "  " + " ".join(keys)]


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dis_dist.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiS-H/2")
    p.add_argument("--resolution", type=number(int), default=256,
                   help="image size in pixels, a multiple of 8 (latents are 1/8)")
    p.add_argument("--gpus", type=number(int), default=8)
    p.add_argument("--gpus-per-node", type=number(int), default=8)
    p.add_argument("--gpu-mem", type=number(float), default=80, help="GB per GPU")
    p.add_argument("--global-batch", type=number(int), default=256)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--num-classes", type=number(int, low_ok=True), default=1000, help="0: unconditional")
    p.add_argument("--cpu", action="store_true",
                   help="CPU ranks: --gpus counts processes, --gpu-mem is the memory each may use, and the "
                        "estimate is resident memory (a process baseline instead of the CUDA reserve)")
    p.add_argument("--context-parallel", type=number(int, low_ok=True), default=1, metavar="K",
                   help="tokens of each sample split over K GPUs (dist.context_parallel); 0: let the planner "
                        "choose among 1, 2, 4, 8 (at most --gpus-per-node, dividing --gpus)")
    args = p.parse_args(argv)
    print(table(args.model, args.resolution, args.gpus, args.gpu_mem, args.global_batch,
                args.gpus_per_node, args.precision, args.num_classes, args.cpu, args.context_parallel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
