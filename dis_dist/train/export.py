"""Any training checkpoint -> one ``model.safetensors`` (EMA weights by default, or raw) plus
``config.json``, loadable by ``build_model`` on any machine, without the training strategy.

Checkpoint layouts (docs/distributed.md, "Checkpoints and exact resume"): ``model.pt`` (single,
ddp), ``dcp/`` (fsdp: torch.distributed.checkpoint, read here without a process group), ``deepspeed/`` plus
``ema_rank<r>.pt`` (DeepSpeed ZeRO: the raw weights through DeepSpeed's zero_to_fp32, the EMA
reassembled from each rank's fragments).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from dis_dist.errors import CheckpointError
from dis_dist.models import DiS
from dis_dist.train.checkpoint import CheckpointManager, is_complete, verify_checkpoint
from dis_dist.train.model_spec import (
    build_meta_model,
    check_finite,
    check_model_spec,
    check_weights,
    layout,
    load_safetensors,
    read_model_spec,
)
from dis_dist.train.safe_load import DataOnlyPlanner, DataOnlyReader, load_torch, torch_load_as_data
from dis_dist.utils.cli import cli_main

USAGE = """Export a training checkpoint (any strategy) to model.safetensors + config.json.

    python tools/export_checkpoint.py runs/dis_h2/checkpoints/step_00400000 --out exports/dis_h2
    python tools/export_checkpoint.py runs/demo --out exports/demo --raw   # newest checkpoint, raw weights

Load the result anywhere with dis_dist.train.export.load_exported(out_dir), or build_model with
the keyword arguments in config.json and safetensors' load_file."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODEL_INFO = "model.json"
DEFAULT_DIFFUSION = {"num_steps": 1000, "schedule": "linear"}


def _from_dcp(directory: Path, prefix: str, model: nn.Module) -> dict[str, Tensor]:
    import torch.distributed.checkpoint as dcp

    reader = DataOnlyReader(str(directory))
    meta = reader.read_metadata().state_dict_metadata
    tensors = {key: m for key, m in meta.items() if key.startswith(prefix + ".") and hasattr(m, "size")}
    check_weights(model, {k[len(prefix) + 1 :]: (tuple(m.size), str(m.properties.dtype).removeprefix("torch."))
                          for k, m in tensors.items()}, directory)  # before allocating what it says
    state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in tensors.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, planner=DataOnlyPlanner(), no_dist=True)
    return {key[len(prefix) + 1 :]: value for key, value in state.items()}


def _deepspeed_ema(directory: Path, model: nn.Module) -> dict[str, Tensor]:
    files = sorted(directory.glob("ema_rank*.pt"))
    parts = [load_torch(f) for f in files]
    if not parts or len(parts) != parts[0]["world_size"]:
        raise CheckpointError(f"{str(directory)!r}: expected one ema_rank<r>.pt per rank, found {len(parts)}")
    check_weights(model, {name: (shape, "float32") for name, shape in parts[0]["shapes"].items()},
                  directory / "ema_rank0.pt")  # before allocating what it says
    full = {name: torch.zeros(math.prod(shape)) for name, shape in parts[0]["shapes"].items()}
    for part in parts:
        for name, (start, frag) in part["fragments"].items():
            n = max(0, min(frag.numel(), full[name].numel() - start))
            full[name][start : start + n] = frag[:n]
    return {name: t.view(parts[0]["shapes"][name]) for name, t in full.items()}


def load_checkpoint_weights(checkpoint: str | Path, model: nn.Module, ema: bool = True) -> dict[str, Tensor]:
    """The whole EMA (or raw) weights of a training checkpoint, fp32 on the CPU, checked against
    ``model`` (built on the meta device: :func:`build_meta_model`): names, shapes, floating-point
    dtypes (where the layout says them, before they are allocated) and finite values."""
    path = Path(checkpoint)
    if not path.is_dir() or not is_complete(path):
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint directory (no COMPLETE marker)")
    verify_checkpoint(path)
    key = "ema" if ema else "model"
    if (path / "model.pt").is_file():
        source = path / "model.pt"
        saved = load_torch(source, map_location="cpu")
        state = saved.get(key) if isinstance(saved, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{source} holds no {key!r} state dict: a damaged checkpoint")
    elif (path / "dcp").is_dir():
        source = path / "dcp"
        state = _from_dcp(source, key, model)
    elif (path / "deepspeed").is_dir():
        source = path / "deepspeed"
        if ema:
            state = _deepspeed_ema(path, model)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with torch_load_as_data():
                state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")
    else:
        raise CheckpointError(f"{str(path)!r} holds no model.pt, dcp/ or deepspeed/: not a dis_dist checkpoint")
    check_weights(model, layout(state), source)
    check_finite(state, source)
    return {k: v.float().contiguous() for k, v in state.items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, ema: bool = True) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``; returns the weights' path."""
    from safetensors.torch import save_file

    path, out = Path(checkpoint), Path(out_dir)
    info_file = path / MODEL_INFO
    if not info_file.is_file():
        raise CheckpointError(f"{str(path)!r} has no {MODEL_INFO} (what build_model needs)")
    info = read_model_spec(info_file)
    state = load_checkpoint_weights(path, build_meta_model(info), ema=ema)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_file(state, str(weights))
    (out / CONFIG_FILE).write_text(json.dumps({**info, "weights": "ema" if ema else "raw",
                                               "checkpoint": str(path.resolve())}, indent=2))
    return weights


def load_exported(directory: str | Path, device: str | torch.device = "cpu", **model_kwargs: object) -> DiS:
    """The model of an exported directory, in eval mode (``model_kwargs`` go to build_model)."""
    return load_model(directory, device=device, **model_kwargs)[0]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as is; a run directory -> its newest complete checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = CheckpointManager(path / "checkpoints", keep_last=1).latest()
        if latest is None:
            raise CheckpointError(f"run directory {str(path)!r} has no complete checkpoint")
        return latest
    return path


def load_model(
    path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu", **model_kwargs: object
) -> tuple[DiS, dict]:
    """The model of an exported directory, a checkpoint or a run directory (its newest
    checkpoint; EMA weights unless ``ema=False``), in eval mode, and its description: what
    build_model takes, plus ``vae``, ``scaling_factor``, ``class_names``, ``diffusion``
    (num_steps and schedule; DiS's 1000-step linear one where the files predate it), and the
    ``checkpoint`` and ``weights`` (ema or raw) the weights come from.
    Everything is checked before the model takes memory (dis_dist.train.model_spec): a damaged
    or hostile description or weights file is a CheckpointError naming it and the key."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        info = read_model_spec(path / CONFIG_FILE)
        model = build_meta_model(info, **model_kwargs)
        state = load_safetensors(path / WEIGHTS_FILE, model)
    else:
        path = resolve_checkpoint(path)
        if not (path / MODEL_INFO).is_file():
            raise CheckpointError(
                f"{str(path)!r} is neither an exported model ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a "
                f"checkpoint with {MODEL_INFO}"
            )
        info = {**read_model_spec(path / MODEL_INFO), "checkpoint": str(path.resolve()),
                "weights": "ema" if ema else "raw"}
        if "diffusion" not in info and (path / "config.yaml").is_file():  # written before model.json had it
            info = check_model_spec({**info, "diffusion": _run_config_diffusion(path / "config.yaml")},
                                    path / "config.yaml")
        model = build_meta_model(info, **model_kwargs)
        state = load_checkpoint_weights(path, model, ema=ema)
    info["diffusion"] = {**DEFAULT_DIFFUSION, **(info.get("diffusion") or {})}
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)  # the checked tensors
    return model.to(device).eval(), info


def _run_config_diffusion(file: Path) -> object:
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{file} is unreadable: {type(e).__name__}") from None
    return config.get("diffusion") if isinstance(config, dict) else None


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/export_checkpoint.py", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="a checkpoint directory (step_*), or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    args = p.parse_args(argv)
    path = resolve_checkpoint(args.checkpoint)
    weights = export_checkpoint(path, args.out, ema=not args.raw)
    print(f"exported {'raw' if args.raw else 'EMA'} weights of {path} to {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
