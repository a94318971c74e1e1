"""The DiS backbone: [class, time, patch] tokens through U-shaped bidirectional-Mamba blocks.

Follows the published DiS model (Fei et al., 2024): depth d means d/2 in-blocks, a middle block
and d/2 out-blocks with U-ViT long skips; blocks are Add -> RMSNorm -> mixer with no MLP.
Deviation, on purpose: the final linear and its modulation are zero-initialised (DiT practice).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from einops import rearrange
from torch import Tensor, nn

from dis_dist.errors import ConfigError
from dis_dist.models.layers import DropPath, FinalLayer, LabelEmbedder, RMSNorm, TimestepEmbedder, at_least_fp32
from dis_dist.models.mamba import BiMamba, SSMBranch
from dis_dist.ops.selective_scan.context_parallel import gather_sequence, slice_bounds
from dis_dist.utils.seeding import mix_seed


@dataclass(frozen=True)
class ModelSize:
    width: int
    depth: int


# "T" (tiny) is ours, for the CPU demo and tests; the others are the paper's.
SIZES: dict[str, ModelSize] = {
    "T": ModelSize(128, 4),
    "S": ModelSize(368, 24),
    "B": ModelSize(768, 24),
    "M": ModelSize(768, 48),
    "L": ModelSize(1024, 48),
    "H": ModelSize(1536, 48),
}
PATCH_SIZES = (2, 4, 8)
MODEL_NAMES: tuple[str, ...] = tuple(f"DiS-{s}/{p}" for s in SIZES for p in PATCH_SIZES)
_NAME = re.compile(r"^DiS-([A-Z])/(\d+)$")


class DiSBlock(nn.Module):
    """[skip projection] -> residual add (stochastic depth) -> RMSNorm -> bidirectional Mamba.

    Returns (mixer output, residual stream): the mixer output is what a long skip carries. The
    residual stream and its norm stay in fp32 under any autocast or parameter dtype (the
    reference code's ``residual_in_fp32``, and its fp32 norms).
    """

    def __init__(
        self, width: int, drop_path: float, skip: bool, norm_eps: float, **mixer_kwargs: object
    ) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * width, width) if skip else None
        self.norm = RMSNorm(width, eps=norm_eps)
        self.mixer = BiMamba(width, **mixer_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, hidden: Tensor, residual: Tensor | None, skip: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if self.skip_linear is not None:
            hidden = self.skip_linear(torch.cat([hidden, skip], dim=-1))
        residual = at_least_fp32(hidden if residual is None else residual + self.drop_path(hidden))
        return self.mixer(self.norm(residual)), residual


class DiS(nn.Module):
    """DiS: images/latents (b, C, H, W), timesteps (b,), labels (b,) -> (b, out_channels, H, W).

    ``num_classes=0`` builds an unconditional model (no class token, no modulation); otherwise
    label ``num_classes`` is the null class used for classifier-free guidance. ``seed`` seeds
    the initial weights (:meth:`initialize_weights`); built under ``torch.device("meta")`` the
    model has no storage and no values until a strategy materialises it.
    """

    def __init__(
        self,
        *,
        input_size: int,
        patch_size: int,
        in_channels: int,
        width: int,
        depth: int,
        num_classes: int,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        drop_path_rate: float = 0.1,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        norm_eps: float = 1e-5,
        scan_backend: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if depth % 2:
            raise ConfigError(f"depth must be even (d/2 in-blocks, a middle block, d/2 out-blocks), got {depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.width, self.depth, self.num_classes = width, depth, num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_patches = (input_size // patch_size) ** 2
        self.num_prefix = 2 if num_classes > 0 else 1

        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.time_embed = TimestepEmbedder(width)
        self.label_embed = (
            LabelEmbedder(num_classes, width, class_dropout_prob) if num_classes > 0 else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, width))

        rates = [0.0] + torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        mixer = dict(d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend)
        half = depth // 2
        self.in_blocks = nn.ModuleList(
            DiSBlock(width, rates[i], False, norm_eps, **mixer) for i in range(half)
        )
        self.mid_block = DiSBlock(width, rates[half], False, norm_eps, **mixer)
        self.out_blocks = nn.ModuleList(
            DiSBlock(width, rates[half + 1 + i], True, norm_eps, **mixer) for i in range(half)
        )
        self.norm_f = RMSNorm(width, eps=norm_eps)
        self.final_drop_path = DropPath(drop_path_rate)
        self.final_layer = FinalLayer(width, patch_size, self.out_channels, num_classes > 0)
        self.checkpoint_every = 0
        self.cp_group: dist.ProcessGroup | None = None
        self.initialize_weights(seed)

    @property
    def num_tokens(self) -> int:
        """The length of the sequence the blocks scan: prefix tokens, then the patches."""
        return self.num_prefix + self.num_patches

    def set_context_parallel(self, group: dist.ProcessGroup | None) -> None:
        """Split each sample's token sequence over the ranks of ``group`` (contiguous slices in
        rank order, :func:`slice_bounds`): every rank embeds all tokens, runs the blocks on its
        slice, and the per-token outputs are gathered, so every rank of the group returns the
        whole output (and must get the same inputs). None: the whole sequence on this rank."""
        if group is not None:
            k, d_conv = dist.get_world_size(group), self.mid_block.mixer.fwd.conv1d.kernel_size[0]
            if self.num_tokens // k < d_conv - 1:
                raise ConfigError(
                    f"{self.num_tokens} tokens split over {k} context-parallel ranks leave slices shorter "
                    f"than the conv halo ({d_conv - 1} tokens): lower dist.context_parallel"
                )
        self.cp_group = group
        for mixer in self._mixers():
            mixer.cp_group = group

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute the activations of every ``every``-th block (in execution order, starting
        with the first) in the backward pass instead of keeping them; 0 turns it off."""
        self.checkpoint_every = every

    @torch.no_grad()
    def initialize_weights(self, seed: int = 0) -> None:
        """Every parameter from its own generator, seeded by ``seed`` and the parameter's name
        (:meth:`initial_value`): the same weights however the model is later split or sharded."""
        for name, p in self.named_parameters():
            if not p.is_meta:
                p.copy_(self.initial_value(name, seed))

    def initial_value(self, name: str, seed: int) -> Tensor:
        """The whole initial value (fp32, CPU) of parameter ``name`` for seed ``seed``; a sharded
        strategy computes it on every rank and keeps its own slice."""
        p = self.get_parameter(name)
        t = torch.empty(p.shape, dtype=torch.float32)
        self.init_tensor(name, t, torch.Generator().manual_seed(parameter_seed(seed, name)))
        return t

    @torch.no_grad()
    def init_tensor(self, name: str, t: Tensor, generator: torch.Generator) -> None:
        """Fill ``t`` with the initial value of parameter ``name``: Mamba's init in the scan
        branches (:meth:`SSMBranch.init_tensor`), PyTorch's default for Linear and Conv weights
        and conv biases, zero Linear biases, N(0, 0.02) embeddings, out_proj scaled by
        1/sqrt(depth); positional embedding zero; final layer zero (DiT)."""
        *path, attr = name.split(".")
        owner: nn.Module = self
        for i, part in enumerate(path):
            owner = getattr(owner, part)
            if isinstance(owner, SSMBranch):
                return owner.init_tensor(".".join(path[i + 1 :] + [attr]), t, generator)
        if name == "pos_embed" or name.startswith("final_layer."):
            t.zero_()
        elif isinstance(owner, nn.Embedding):
            nn.init.normal_(t, std=0.02, generator=generator)
        elif isinstance(owner, RMSNorm):
            t.fill_(1.0)
        elif isinstance(owner, nn.Linear | nn.Conv2d) and attr == "weight":
            nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            if name.endswith("mixer.out_proj.weight"):
                t /= math.sqrt(self.depth)
        elif isinstance(owner, nn.Linear) and attr == "bias":
            t.zero_()
        elif isinstance(owner, nn.Conv2d) and attr == "bias":  # PyTorch's default
            bound = 1 / math.sqrt(math.prod(owner.weight.shape[1:]))
            nn.init.uniform_(t, -bound, bound, generator=generator)
        else:
            raise KeyError(f"no initialisation rule for parameter {name!r}")

    def _mixers(self) -> Iterator[BiMamba]:
        return (block.mixer for block in self.blocks())

    def blocks(self) -> list[DiSBlock]:
        """All blocks in execution order (the units of sharding and activation checkpointing)."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def _run(self, index: int, block: DiSBlock, *args: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.checkpoint_every and index % self.checkpoint_every == 0 and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(b, h*w, p*p*C) -> (b, C, h*p, w*p), raster order of patches."""
        h = w = self.input_size // self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=self.patch_size, q=self.patch_size)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        tokens = rearrange(self.patch_embed(x), "b d h w -> b (h w) d")
        time_token = self.time_embed(t)
        prefix, cond = [time_token[:, None]], None
        if self.label_embed is not None:
            if y is None:
                raise ValueError("a class-conditional DiS needs labels y (use num_classes for the null class)")
            label_token = self.label_embed(y)
            prefix.insert(0, label_token[:, None])
            cond = time_token + label_token
        hidden = at_least_fp32(torch.cat(prefix + [tokens.to(time_token.dtype)], dim=1)) + self.pos_embed
        if self.cp_group is not None:
            start, end = slice_bounds(self.num_tokens, dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group))
            hidden = hidden[:, start:end]

        residual, skips = None, []
        for i, block in enumerate(self.in_blocks):
            hidden, residual = self._run(i, block, hidden, residual)
            skips.append(hidden)
        half = len(self.in_blocks)
        hidden, residual = self._run(half, self.mid_block, hidden, residual)
        for i, block in enumerate(self.out_blocks, start=half + 1):
            hidden, residual = self._run(i, block, hidden, residual, skips.pop())
        hidden = self.norm_f(residual + self.final_drop_path(hidden))
        out = self.final_layer(hidden, cond)
        if self.cp_group is not None:
            out = gather_sequence(out, self.num_tokens, self.cp_group)
        return self.unpatchify(out[:, self.num_prefix :])


def parameter_seed(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s initial value."""
    return mix_seed(seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little"))


def parse_model_name(name: str) -> tuple[ModelSize, int]:
    """'DiS-H/2' -> (its width/depth, patch size). Unknown names raise ConfigError."""
    m = _NAME.match(name)
    if not m or m.group(1) not in SIZES or int(m.group(2)) not in PATCH_SIZES:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return SIZES[m.group(1)], int(m.group(2))


def build_model(
    name: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = True,
    **kwargs: object,
) -> DiS:
    """Build a registry model, e.g. ``build_model("DiS-H/2", input_size=32, in_channels=4,
    num_classes=1000)``. Extra keyword arguments go to :class:`DiS` (drop_path_rate,
    class_dropout_prob, scan_backend, ...)."""
    size, patch = parse_model_name(name)
    return DiS(
        input_size=input_size,
        patch_size=patch,
        in_channels=in_channels,
        width=size.width,
        depth=size.depth,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        **kwargs,
    )
