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
from torch import Tensor

from dis_dist.errors import CheckpointError
from dis_dist.models import DiS, build_model
from dis_dist.train.checkpoint import CheckpointManager, is_complete, verify_checkpoint
from dis_dist.train.safe_load import DataOnlyPlanner, DataOnlyReader, load_torch, torch_load_as_data
from dis_dist.utils.cli import cli_main

USAGE = """Export a training checkpoint (any strategy) to model.safetensors + config.json.

    python tools/export_checkpoint.py runs/dis_h2/checkpoints/step_00400000 --out exports/dis_h2
    python tools/export_checkpoint.py runs/demo --out exports/demo --raw   # newest checkpoint, raw weights

Load the result anywhere with dis_dist.train.export.load_exported(out_dir), or build_model with
the keyword arguments in config.json and safetensors' load_file."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
BUILD_KEYS = ("name", "input_size", "in_channels", "num_classes", "learn_sigma")
DEFAULT_DIFFUSION = {"num_steps": 1000, "schedule": "linear"}


def _from_dcp(directory: Path, prefix: str) -> dict[str, Tensor]:
    import torch.distributed.checkpoint as dcp

    reader = DataOnlyReader(str(directory))
    meta = reader.read_metadata().state_dict_metadata
    state = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in meta.items() if key.startswith(prefix + ".") and hasattr(m, "size")
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, planner=DataOnlyPlanner(), no_dist=True)
    return {key[len(prefix) + 1 :]: value for key, value in state.items()}


def _deepspeed_ema(directory: Path) -> dict[str, Tensor]:
    files = sorted(directory.glob("ema_rank*.pt"))
    parts = [load_torch(f) for f in files]
    if not parts or len(parts) != parts[0]["world_size"]:
        raise CheckpointError(f"{str(directory)!r}: expected one ema_rank<r>.pt per rank, found {len(parts)}")
    full = {name: torch.zeros(math.prod(shape)) for name, shape in parts[0]["shapes"].items()}
    for part in parts:
        for name, (start, frag) in part["fragments"].items():
            n = max(0, min(frag.numel(), full[name].numel() - start))
            full[name][start : start + n] = frag[:n]
    return {name: t.view(parts[0]["shapes"][name]) for name, t in full.items()}


def load_checkpoint_weights(checkpoint: str | Path, ema: bool = True) -> dict[str, Tensor]:
    """The whole EMA (or raw) weights of a training checkpoint, fp32 on the CPU."""
    path = Path(checkpoint)
    if not path.is_dir() or not is_complete(path):
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint directory (no COMPLETE marker)")
    verify_checkpoint(path)
    if (path / "model.pt").is_file():
        state = load_torch(path / "model.pt", map_location="cpu")["ema" if ema else "model"]
    elif (path / "dcp").is_dir():
        state = _from_dcp(path / "dcp", "ema" if ema else "model")
    elif (path / "deepspeed").is_dir():
        if ema:
            state = _deepspeed_ema(path)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with torch_load_as_data():
                state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")
    else:
        raise CheckpointError(f"{str(path)!r} holds no model.pt, dcp/ or deepspeed/: not a dis_dist checkpoint")
    return {k: v.float().contiguous() for k, v in state.items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, ema: bool = True) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``; returns the weights' path."""
    from safetensors.torch import save_file

    path, out = Path(checkpoint), Path(out_dir)
    info_file = path / "model.json"
    if not info_file.is_file():
        raise CheckpointError(f"{str(path)!r} has no model.json (what build_model needs)")
    info = json.loads(info_file.read_text())
    state = load_checkpoint_weights(path, ema=ema)
    with torch.device("meta"):  # checks names and shapes without allocating a model
        build_model(**{k: info[k] for k in BUILD_KEYS}).load_state_dict(state, assign=True)
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
    ``checkpoint`` and ``weights`` (ema or raw) the weights come from."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        info = json.loads((path / CONFIG_FILE).read_text())
        state = load_file(str(path / WEIGHTS_FILE))
    else:
        path = resolve_checkpoint(path)
        if not (path / "model.json").is_file():
            raise CheckpointError(
                f"{str(path)!r} is neither an exported model (config.json + {WEIGHTS_FILE}) nor a "
                f"checkpoint with model.json"
            )
        info = {**json.loads((path / "model.json").read_text()), "checkpoint": str(path.resolve()),
                "weights": "ema" if ema else "raw"}
        if "diffusion" not in info and (path / "config.yaml").is_file():
            info["diffusion"] = yaml.safe_load((path / "config.yaml").read_text()).get("diffusion")
        state = load_checkpoint_weights(path, ema=ema)
    info["diffusion"] = {**DEFAULT_DIFFUSION, **(info.get("diffusion") or {})}
    model = build_model(**{k: info[k] for k in BUILD_KEYS}, **model_kwargs)
    model.load_state_dict(state)
    return model.to(device).eval(), info


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
