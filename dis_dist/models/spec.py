"""A model's description: :class:`ModelSpec`, what ``build_model`` needs to build a DiS, and what a
description file (a checkpoint's ``model.json``, an export's ``config.json``) and the weights
beside it must be before anything is built from them. A damaged or hostile file is one
CheckpointError naming the file and the key, never a traceback, a 34 GB allocation or a model
that samples NaN: sizes are checked against the model registry before any model exists, the
weights' names, shapes and dtypes against the model built on the meta device (no memory), and
their values for being finite once loaded."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
from torch import Tensor, nn

from dis_dist.diffusion.schedule import SCHEDULES
from dis_dist.errors import CheckpointError
from dis_dist.models.dis import MODEL_NAMES, DiS, build_model, parse_model_name
from dis_dist.models.flops import FlopCount, count_parameters, model_flops


@dataclass(frozen=True)
class ModelSpec:
    """Holds what ``build_model`` needs to build a DiS: the keys every model description holds."""

    name: str  # a registry name, DiS-{T,S,B,M,L,H}/{2,4,8}
    input_size: int  # latent (or pixel) height and width
    in_channels: int
    num_classes: int  # 0: unconditional
    learn_sigma: bool = True

    @classmethod
    def of(cls, info: Mapping) -> ModelSpec:
        """Take the build keys of a (checked) description."""
        return cls(**{k: info[k] for k in BUILD_KEYS})

    def build(self, **model_kwargs: object) -> DiS:
        """Build the model (``model_kwargs``: drop_path_rate, scan_backend, ...); on the meta device
        inside ``with torch.device("meta")``."""
        return build_model(**asdict(self), **model_kwargs)

    def build_meta(self, **model_kwargs: object) -> DiS:
        """Build the model on the meta device: its tensors' names and shapes without their memory."""
        with torch.device("meta"):
            return self.build(**model_kwargs)

    def flops(self) -> FlopCount:
        """Count the forward FLOPs of one sample (dis_dist.models.flops)."""
        return model_flops(**asdict(self))

    def num_parameters(self) -> int:
        return count_parameters(**asdict(self))


BUILD_KEYS = tuple(ModelSpec.__dataclass_fields__)
# Sane bounds: far above any real model (DiS-H/2 at 512 px has 64 x 64 x 4 latents, ImageNet-21k
# 21,841 classes), far below what would exhaust a machine's memory when built.
MAX_INPUT_SIZE = 4096
MAX_CHANNELS = 1024
MAX_CLASSES = 1_000_000
MAX_DIFFUSION_STEPS = 100_000
# The diffusion a description means when it names none (a hand-written config.json of DiS's
# published weights): the paper's 1000-step linear schedule.
DIFFUSION = {"num_steps": 1000, "schedule": "linear"}
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")  # converted to the model's float32
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is not an int, nor is 16.0


def _is_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def check_model_spec(info: object, file: str | Path) -> dict:
    """Check a parsed ``model.json``/``config.json``: build_model's arguments (exact types, a
    registry name, sizes in range) and the optional keys sampling reads (``diffusion``, ``vae``,
    ``scaling_factor``, ``class_names``). Returns it, ``diffusion`` completed with
    :data:`DIFFUSION`'s keys; CheckpointError naming ``file`` and the first bad key otherwise."""

    def fail(what: str) -> NoReturn:
        raise CheckpointError(f"{file}: {what} (a damaged or foreign file: correct it, or use another "
                              f"checkpoint or export)")

    if not isinstance(info, dict):
        fail(f"holds a {type(info).__name__}, not a JSON object")
    missing = [k for k in BUILD_KEYS if k not in info]
    if missing:
        fail(f"no {', '.join(missing)} (what build_model needs)")
    name = info["name"]
    if not isinstance(name, str) or name not in MODEL_NAMES:
        fail(f"name {name!r} is not a model of the registry ({', '.join(MODEL_NAMES)})")
    patch = parse_model_name(name)[1]
    size = info["input_size"]
    if not (_is_int(size) and 0 < size <= MAX_INPUT_SIZE and size % patch == 0):
        fail(f"input_size {size!r} is not a positive multiple of {name}'s patch size {patch} up to {MAX_INPUT_SIZE}")
    for key, low, high in (("in_channels", 1, MAX_CHANNELS), ("num_classes", 0, MAX_CLASSES)):
        if not (_is_int(info[key]) and low <= info[key] <= high):
            fail(f"{key} {info[key]!r} is not an integer in [{low}, {high}]")
    if type(info["learn_sigma"]) is not bool:
        fail(f"learn_sigma {info['learn_sigma']!r} is not true or false")
    diffusion = info.get("diffusion", {})
    if not isinstance(diffusion, dict):
        fail(f"diffusion {diffusion!r} is not an object (num_steps, schedule)")
    diffusion = info["diffusion"] = {**DIFFUSION, **diffusion}
    steps = diffusion["num_steps"]
    if not (_is_int(steps) and 1 <= steps <= MAX_DIFFUSION_STEPS):
        fail(f"diffusion.num_steps {steps!r} is not an integer in [1, {MAX_DIFFUSION_STEPS}]")
    if diffusion["schedule"] not in SCHEDULES:
        fail(f"diffusion.schedule {diffusion['schedule']!r} is not one of {', '.join(SCHEDULES)}")
    if not isinstance(info.get("vae", ""), str):
        fail(f"vae {info['vae']!r} is not a string (a VAE's hub id or directory, or pixels)")
    if not (_is_number(info.get("scaling_factor", 1.0)) and info.get("scaling_factor", 1.0) > 0):
        fail(f"scaling_factor {info['scaling_factor']!r} is not a positive number")
    names = info.get("class_names", [])
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        fail(f"class_names {names!r:.80} is not a list of strings")
    return info


def read_model_spec(file: Path) -> dict:
    """Read a model description file and check it (:func:`check_model_spec`)."""
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file} is unreadable: {type(e).__name__}: {str(e)[:200]}") from None
    return check_model_spec(info, file)


def _some(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_weights(model: nn.Module, tensors: Mapping[str, tuple[Sequence[int], str]], file: str | Path) -> None:
    """Check ``tensors`` (name -> (shape, dtype name), read from a file's header) against ``model``'s
    state dict: the same names, the same shapes, floating-point dtypes. CheckpointError naming
    ``file`` and the first tensors that differ."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {_some(missing)}")
    if extra:
        problems.append(f"unexpected tensor(s) {_some(extra)}")
    shapes = [f"{k} {tuple(s)} (expected {expected[k]})" for k, (s, _) in tensors.items()
              if k in expected and tuple(s) != expected[k]]
    if shapes:
        problems.append(f"tensor(s) of another shape: {_some(shapes)}")
    dtypes = [f"{k} {d}" for k, (_, d) in tensors.items() if d not in FLOAT_DTYPES]
    if dtypes:
        problems.append(f"tensor(s) not of a floating-point dtype: {_some(dtypes)}")
    if problems:
        raise CheckpointError(f"{file} does not hold the weights of the model its description names "
                              f"({'; '.join(problems)}): a damaged file, or the weights of another model")


def layout(state: Mapping[str, Tensor]) -> dict[str, tuple[Sequence[int], str]]:
    """Map loaded tensors' names to (shape, dtype name), as :func:`check_weights` takes them."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def check_finite(state: Mapping[str, Tensor], file: str | Path) -> None:
    """Raise CheckpointError naming ``file`` and the tensors holding NaN or infinite values."""
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{file}: {len(bad)} of {len(state)} tensors hold values that are not finite "
                              f"(NaN or inf): {_some(bad)}; export an earlier checkpoint")


def load_safetensors(file: Path, model: nn.Module) -> dict[str, Tensor]:
    """Load a ``.safetensors`` file's tensors, its header checked against ``model`` (on the meta
    device) before any tensor is read, the values checked for being finite after."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), "pt") as f:
            header = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
        check_weights(model, {k: (s, _SAFETENSORS_DTYPES.get(d, d)) for k, (s, d) in header.items()}, file)
        state = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}): export the checkpoint again") from None
    check_finite(state, file)
    return state
