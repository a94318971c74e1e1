"""Any training checkpoint -> one ``model.safetensors`` (EMA weights by default, or raw) plus
``config.json``, loadable by ``build_model`` on any machine, without the training strategy.

Each strategy owns its checkpoint layout (docs/distributed.md, "Checkpoints and exact resume"),
including reading its whole weights offline (``Strategy.read_weights``); export asks the
strategy whose layout a checkpoint has.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from dis_dist.distributed.registry import checkpoint_strategy
from dis_dist.errors import CheckpointError
from dis_dist.models import DiS
from dis_dist.models.spec import ModelSpec, check_finite, check_weights, layout, load_safetensors, read_model_spec
from dis_dist.train.checkpoint import CheckpointManager, is_complete, verify_checkpoint
from dis_dist.utils.cli import cli_main

USAGE = """Export a training checkpoint (any strategy) to model.safetensors + config.json.

    python tools/export_checkpoint.py runs/dis_h2/checkpoints/step_00400000 --out exports/dis_h2
    python tools/export_checkpoint.py runs/demo --out exports/demo --raw   # newest checkpoint, raw weights

Load the result anywhere with dis_dist.train.export.load_exported(out_dir), or build_model with
the keyword arguments in config.json and safetensors' load_file."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODEL_INFO = "model.json"


def read_checkpoint_info(path: Path) -> dict:
    """Read a checkpoint's ``model.json``, checked (dis_dist.models.spec)."""
    info_file = path / MODEL_INFO
    if not info_file.is_file():
        raise CheckpointError(f"{str(path)!r} has no {MODEL_INFO} (what build_model needs)")
    return read_model_spec(info_file)


def load_checkpoint_weights(path: Path, model: nn.Module, ema: bool = True) -> dict[str, Tensor]:
    """Read the whole EMA (or raw) weights of the checkpoint at ``path`` into fp32 CPU tensors,
    through the strategy whose layout it has, and check them against ``model`` (built on the meta
    device): names, shapes, floating-point dtypes and finite values."""
    if not path.is_dir() or not is_complete(path):
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint directory (no COMPLETE marker)")
    verify_checkpoint(path)
    state, source = checkpoint_strategy(path).read_weights(path, model, ema)
    check_weights(model, layout(state), source)
    check_finite(state, source)
    return {k: v.float().contiguous() for k, v in state.items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, ema: bool = True) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``; returns the weights' path."""
    from safetensors.torch import save_file

    path, out = Path(checkpoint), Path(out_dir)
    info = read_checkpoint_info(path)
    state = load_checkpoint_weights(path, ModelSpec.of(info).build_meta(), ema=ema)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_file(state, str(weights))
    (out / CONFIG_FILE).write_text(json.dumps({**info, "weights": "ema" if ema else "raw",
                                               "checkpoint": str(path.resolve())}, indent=2))
    return weights


def load_exported(directory: str | Path, device: str | torch.device = "cpu", **model_kwargs: object) -> DiS:
    """Load the model of an exported directory, in eval mode (``model_kwargs`` go to build_model)."""
    return load_model(directory, device=device, **model_kwargs)[0]


def resolve_checkpoint(path: str | Path) -> Path:
    """Return a checkpoint directory as it is, and a run directory's newest complete checkpoint."""
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
    """Load the model of an exported directory, a checkpoint or a run directory (its newest
    checkpoint; EMA weights unless ``ema=False``), in eval mode, and its description: what
    build_model takes, plus ``vae``, ``scaling_factor``, ``class_names``, ``diffusion``
    (num_steps and schedule), and the ``checkpoint`` and ``weights`` (ema or raw) the weights
    come from. Everything is checked before the model takes memory (dis_dist.models.spec): a
    damaged or hostile description or weights file is a CheckpointError naming it and the key."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        info = read_model_spec(path / CONFIG_FILE)
        model = ModelSpec.of(info).build_meta(**model_kwargs)
        state = load_safetensors(path / WEIGHTS_FILE, model)
    else:
        path = resolve_checkpoint(path)
        if not (path / MODEL_INFO).is_file():
            raise CheckpointError(
                f"{str(path)!r} is neither an exported model ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a "
                f"checkpoint with {MODEL_INFO}"
            )
        info = {**read_checkpoint_info(path), "checkpoint": str(path.resolve()), "weights": "ema" if ema else "raw"}
        model = ModelSpec.of(info).build_meta(**model_kwargs)
        state = load_checkpoint_weights(path, model, ema=ema)
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)  # the checked tensors
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
