#!/usr/bin/env python3
"""bf16 numerics of the model against float64, per strategy.

One forward pass of DiS (default DiS-S/2 on 32x32x4 latents, 1000 classes, random weights with
the zero-initialised layers filled in) on 4 fixed random inputs, in float64 (the truth), fp32
and bf16 autocast, with the model run as it is (single) and sharded by FSDP2 (one rank, with
the strategy's mixed-precision policy). Prints the relative L2 error of each output against
float64. ``--before REV`` also runs the same measurement with the code of git revision REV
(checked out into a temporary directory), for a before/after table in one call.

    python tools/bench_numerics.py
    python tools/bench_numerics.py --before 3d10a9a --json numerics.json
    python tools/bench_numerics.py --device cuda      # bf16 under CUDA's autocast (float64 on the CPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("DIS_NUMERICS_CODE", ROOT))
sys.path.insert(0, str(CODE))
os.environ.setdefault("DIS_SCAN_COMPILE", "0")  # the same numbers, without compiling for one pass

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dis_dist.config import load_config  # noqa: E402
from dis_dist.distributed.env import DistEnv  # noqa: E402
from dis_dist.models import build_model  # noqa: E402


def rel_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return float((out.double() - truth).norm() / truth.norm())


def measure(model_name: str, latent: int, channels: int, classes: int, samples: int, seed: int,
            device: torch.device) -> dict[str, float]:
    """{"<strategy> <precision>": relative L2 error of the output against float64 (on the CPU)}."""
    torch.manual_seed(seed)
    model = build_model(model_name, input_size=latent, in_channels=channels, num_classes=classes).eval()
    with torch.no_grad():  # random values where DiT's init puts zeros, or the output is 0
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(samples, channels, latent, latent, generator=g)
    t = torch.linspace(1, 999, samples).round()
    y = torch.randint(0, classes, (samples,), generator=g)
    with torch.no_grad():
        truth = model.double()(x.double(), t.double(), y)
    model.float()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    x, t, y = x.to(device), t.to(device), y.to(device)
    results = {}
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")
        with torch.no_grad(), autocast:
            results[f"single {precision}"] = rel_error(model(x, t, y).cpu(), truth)
        out = _fsdp_forward(model_name, latent, channels, classes, state, precision, x, t, y, device)
        results[f"fsdp {precision}"] = rel_error(out.cpu(), truth)
    return results


def _fsdp_forward(model_name: str, latent: int, channels: int, classes: int, state: dict, precision: str,
                  x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The model's output under FSDPStrategy on a process group of one rank."""
    from dis_dist.distributed.fsdp import FSDPStrategy

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="numerics_store_"), 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=5))
    cfg = load_config(None, ["dist.strategy=fsdp", f"train.precision={precision}"])
    model = build_model(model_name, input_size=latent, in_channels=channels, num_classes=classes)
    model.load_state_dict(state)
    strategy = FSDPStrategy(DistEnv(0, 1, 0, device), cfg, model, 1,
                            lambda groups: torch.optim.AdamW(groups),
                            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    strategy.model.eval()
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
        return strategy.model(x, t, y).float()


def measure_at(revision: str, argv: list[str]) -> dict[str, float]:
    """``measure`` with the code of a git revision (this script, that revision's package)."""
    with tempfile.TemporaryDirectory(prefix="numerics_rev_") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        out = Path(tmp) / "result.json"
        env = {**os.environ, "DIS_NUMERICS_CODE": tmp, "PYTHONPATH": tmp}
        subprocess.run([sys.executable, __file__, *argv, "--json", str(out)], env=env, check=True)
        return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="DiS-S/2")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the fp32/bf16 passes run (cpu, cuda)")
    p.add_argument("--before", help="a git revision to measure too (the code before a change)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    shape = ["--model", args.model, "--latent", str(args.latent), "--channels", str(args.channels),
             "--classes", str(args.classes), "--samples", str(args.samples), "--seed", str(args.seed),
             "--device", args.device]
    device = torch.device(args.device)
    after = measure(args.model, args.latent, args.channels, args.classes, args.samples, args.seed, device)
    before = measure_at(args.before, shape) if args.before else None
    if dist.is_initialized():
        dist.destroy_process_group()
    if args.json:
        Path(args.json).write_text(json.dumps(after if before is None else {"after": after, "before": before}))
    if CODE != ROOT:  # a measurement for measure_at: no table
        return 0
    print(f"{args.model}, {args.latent}x{args.latent}x{args.channels}, {args.samples} random inputs, on {device}: "
          f"relative L2 error of the output vs float64")
    header = f"{'strategy':10} {'fp32':>10} " + (f"{'bf16 before':>12} " if before else "") + f"{'bf16':>10}"
    print(header)
    print("-" * len(header))
    for strategy in ("single", "fsdp"):
        row = f"{strategy:10} {after[f'{strategy} fp32']:10.2e} "
        if before:
            row += f"{before[f'{strategy} bf16']:12.2e} "
        print(row + f"{after[f'{strategy} bf16']:10.2e}")
    if before:
        print(f"(bf16 before: revision {args.before}; its fp32 errors: single {before['single fp32']:.2e}, "
              f"fsdp {before['fsdp fp32']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
