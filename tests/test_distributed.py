"""Distributed strategies on CPU with gloo: ``torchrun --nproc_per_node=2`` started from pytest.

One 2-rank launch trains every scenario (tests/dist_run.py), all with the default label dropout
and drop path; the tests compare what it wrote with single-process training on the same global
batch in the same sample order (the data, timesteps, noise and dropout of a global step do not
depend on the number of ranks), with itself after a SIGTERM and a resume (reading the shard
stream with 0 and 2 workers), with itself resumed past a planted checkpoint, and with a 1-rank
resume of its FSDP checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dis_dist.config import load_config
from dis_dist.models import build_model
from dis_dist.plan import estimate
from dis_dist.train.checkpoint import CheckpointManager
from dis_dist.train.export import export_checkpoint, load_exported
from dis_dist.train.trainer import Trainer

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
STRATEGIES = {
    "ddp": ["dist.strategy=ddp"],
    "fsdp": ["dist.strategy=fsdp"],
    "fsdp_zero2": ["dist.strategy=fsdp", "dist.reshard_after_forward=false"],
    "fsdp_async": ["dist.strategy=fsdp", "checkpoint.async_save=true"],
    "zero1": ["dist.strategy=deepspeed", "dist.zero_stage=1"],
    "zero2": ["dist.strategy=deepspeed", "dist.zero_stage=2"],
    "zero3": ["dist.strategy=deepspeed", "dist.zero_stage=3"],
    # Each sample's 18 tokens split over the 2 ranks (one data-parallel rank).
    "fsdp_cp2": ["dist.strategy=fsdp", "dist.context_parallel=2"],
    "ddp_cp2": ["dist.strategy=ddp", "dist.context_parallel=2"],
}
# 4-rank runs compared with single-process training: FSDP over a 2 (dp) x 2 (cp) mesh.
WORLD4 = {"fsdp_cp2_world4": STRATEGIES["fsdp_cp2"]}
# Variants compared with their base strategy rather than with single-process training.
VARIANTS = {
    "fsdp_ckpt": STRATEGIES["fsdp"] + ["train.activation_checkpointing=1"],
    "hsdp": STRATEGIES["fsdp"] + ["dist.shard_group_size=1"],
}
BF16 = {
    "fsdp_bf16": STRATEGIES["fsdp"] + ["train.precision=bf16"],
    "zero2_bf16": STRATEGIES["zero2"] + ["train.precision=bf16"],
}

pytestmark = pytest.mark.slow


# Exact resume is checked on the shard stream with each number of DataLoader workers.
STREAM_WORKERS = {"ddp": (0, 2), "fsdp": (0, 2), "fsdp_zero2": (2,), "fsdp_async": (2,), "zero1": (0, 2),
                  "zero2": (0, 2), "zero3": (0, 2), "fsdp_cp2": (2,)}
PLANTED = ("fsdp", "zero2")


def overrides(run_dir: Path, fmnist_root: Path, classifier: Path, reference: Path, *extra: str) -> list[str]:
    # The default label dropout (0.1) and drop path (0.1). An evaluation at the end: its samples
    # are drawn by every rank and scored on rank 0 (against the statistics of 1,000 test images:
    # the subject is who draws and scores them, not the reference).
    return [
        f"run_dir={run_dir}", f"data.root={fmnist_root}", "model.name=DiS-T/8",
        f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=4", "train.ema_decay=0.8",
        "optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=cosine", "optim.weight_decay=0.01",
        "optim.grad_clip=0.5", "sample.every=3", "sample.num=4", "sample.steps=2", "sample.batch_size=3",
        "checkpoint.every=3", "log.every=2", f"eval.every={STEPS}", "eval.features=fmnist",
        f"eval.weights={classifier}", f"eval.reference={reference}", "eval.num_samples=8", "eval.batch_size=4",
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp: Path, scenarios: list[dict], nproc: int) -> None:
    spec = tmp / f"spec_{nproc}.json"
    spec.write_text(json.dumps(scenarios))
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", str(ROOT / "tests" / "dist_run.py"), str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"


def rel_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).detach().double().pow(2).sum()) for k in a)
    den = sum(float(b[k].detach().double().pow(2).sum()) for k in a)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path, classifier: Path, fmnist_reference: Path,
         fmnist_cache: Path) -> dict:
    """Every scenario's output: 2-rank runs (straight; on the shard stream straight and
    signalled/resumed; resumed past a planted checkpoint; ZeRO-3's initial weights),
    single-process references, 1-rank runs of the memory baselines and the FSDP resume at world
    size 1, and 4-rank runs."""
    require(importlib.util.find_spec("deepspeed") is not None, "DeepSpeed (pip install deepspeed)")
    tmp = tmp_path_factory.mktemp("dist")

    def scenario(name: str, *extra: str, **options: object) -> dict:
        return {"overrides": overrides(tmp / name, fmnist_root, classifier, fmnist_reference, *extra),
                "out": str(tmp / f"{name}.pt"), **options}

    # The initial weights of meta-device init, at 4 ranks (fsdp, hsdp 2x2, ddp) and at 2 (ZeRO-3).
    init = {"init_zero3_world2": STRATEGIES["zero3"], "init_fsdp_world4": STRATEGIES["fsdp"],
            "init_hsdp_world4": STRATEGIES["fsdp"] + ["dist.shard_group_size=2"], "init_ddp_world4": STRATEGIES["ddp"]}

    def init_only(nproc: int) -> list[dict]:
        return [scenario(name, *extra, "eval.every=0", "train.micro_batch=2", init_only=True)
                for name, extra in init.items() if name.endswith(f"world{nproc}")]

    two = [scenario(name, *extra) for name, extra in {**STRATEGIES, **VARIANTS, **BF16}.items()]
    for name, workers in STREAM_WORKERS.items():
        for w in workers:
            stream = [*STRATEGIES[name], "data.source=shards", f"data.url={fmnist_cache}", f"data.num_workers={w}",
                      "data.shuffle_buffer=64", "eval.every=0"]
            for suffix, signal_at in (("", None), ("_resumed", 2)):
                two.append(scenario(f"{name}_stream{w}{suffix}", *stream, signal_at=signal_at))
    two += [scenario(f"{name}_planted", *STRATEGIES[name], plant_from=str(tmp / name)) for name in PLANTED]
    torchrun(tmp, two + init_only(2), nproc=2)  # one launch for every 2-rank scenario

    # A copy of the 2-rank FSDP run, resumed by one rank: it loads step 6 and trains no further.
    shutil.copytree(tmp / "fsdp", tmp / "fsdp_world1")
    torchrun(tmp, [scenario(name, *STRATEGIES[base]) for name, base in [("fsdp_world1", "fsdp"),
                                                                         ("zero3_world1", "zero3")]], nproc=1)
    torchrun(tmp, init_only(4) + [scenario(name, *extra) for name, extra in WORLD4.items()], nproc=4)

    out = {p.stem: torch.load(p, weights_only=False) for p in tmp.glob("*.pt")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): 2 threads on a busy machine crawl
    try:
        single = Trainer(load_config(None, overrides(tmp / "single", fmnist_root, classifier, fmnist_reference)))
        result = single.fit()
    finally:
        torch.set_num_threads(threads)
    out["single"] = {
        "model": single.strategy.full_state_dict(ema=False), "ema": single.strategy.full_state_dict(ema=True),
        "loss": result.final_loss, "numel": [single.strategy.local_numel()], "step": result.step,
        "metrics": result.metrics,
    }
    out["dirs"] = tmp
    return out


@pytest.mark.parametrize("strategy", [*STRATEGIES, *WORLD4])
def test_strategy_matches_single_process(runs: dict, strategy: str) -> None:
    got, ref = runs[strategy], runs["single"]
    assert got["step"] == ref["step"] == STEPS
    model_err, ema_err = rel_error(got["model"], ref["model"]), rel_error(got["ema"], ref["ema"])
    print(f"{strategy}: relative error vs single process: weights {model_err:.2e}, EMA {ema_err:.2e}")
    assert model_err <= 1e-5 and ema_err <= 1e-5
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    # Training moved the weights: the comparison is not between two initialisations.
    init = build_model("DiS-T/8", input_size=32, in_channels=1, num_classes=10)
    assert rel_error(got["model"], {k: v for k, v in init.state_dict().items()}) > 1e-3


@pytest.mark.parametrize("strategy", [*STRATEGIES, *WORLD4])
def test_evaluation_matches_single_process(runs: dict, strategy: str) -> None:
    """Two ranks draw half the evaluation samples each (from every strategy's EMA, broadcast
    where it is sharded); rank 0 scores all of them: the single process's metrics."""
    got, ref = runs[strategy]["metrics"], runs["single"]["metrics"]
    assert set(ref) == {"fd", "accuracy", "precision", "recall"}
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("run", [f"{n}_stream{w}" for n, ws in STREAM_WORKERS.items() for w in ws])
def test_signal_and_resume_match_uninterrupted(runs: dict, run: str) -> None:
    """SIGTERM on rank 0 during step 2, save, resume in a fresh Trainer: bit for bit the weights
    and EMA of the uninterrupted run, with dropout, drop path and the shard stream's workers."""
    straight, resumed = runs[run], runs[f"{run}_resumed"]
    assert resumed["step"] == straight["step"] == STEPS
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{run} {key} {name}")
    assert resumed["loss"] == straight["loss"]


@pytest.mark.parametrize("strategy", PLANTED)
def test_a_planted_newest_checkpoint_is_skipped_and_never_runs(runs: dict, strategy: str) -> None:
    """Every file of the newest checkpoint (DCP shards and metadata; DeepSpeed's engine files
    and EMA fragments) replaced by a code-running pickle: the run resumes from the one before and
    ends where the uninterrupted run did; no payload ran."""
    planted, straight = runs[f"{strategy}_planted"], runs[strategy]
    assert not planted["payload_ran"]
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            torch.testing.assert_close(planted[key][name], value, rtol=0, atol=0, msg=f"{strategy} {key} {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_their_base(runs: dict, variant: str) -> None:
    """Activation checkpointing recomputes the same values; HSDP (2 replicas of 1 shard) computes
    what FSDP does."""
    base = "fsdp"
    assert rel_error(runs[variant]["model"], runs[base]["model"]) <= 1e-6
    assert rel_error(runs[variant]["ema"], runs[base]["ema"]) <= 1e-6


@pytest.mark.parametrize("name", list(BF16))
def test_bf16_trains_without_nan(runs: dict, name: str) -> None:
    got = runs[name]
    assert torch.isfinite(torch.tensor(got["loss"]))
    assert all(torch.isfinite(v).all() for v in got["model"].values())
    assert rel_error(got["model"], runs["single"]["model"]) < 0.05  # bf16 compute, same training


@pytest.mark.parametrize("strategy,baseline", [("fsdp", "single"), ("zero3", "zero3_world1")])
def test_sharded_storage_halves_per_rank(runs: dict, strategy: str, baseline: str) -> None:
    """Parameters + optimiser states + EMA stored per rank with 2 ranks: about half of 1 rank's."""
    one = sum(runs[baseline]["numel"][0].values())
    for rank_numel in runs[strategy]["numel"]:
        print(f"{strategy} rank storage {rank_numel} vs {baseline} {runs[baseline]['numel'][0]}")
        assert 0.49 <= sum(rank_numel.values()) / one <= 0.52


@pytest.mark.parametrize("strategy,setting", [("fsdp", "fsdp"), ("zero3", "zero3"), ("zero2", "zero2"), ("ddp", "ddp")])
def test_planner_model_states_match_measured(runs: dict, strategy: str, setting: str) -> None:
    """The planner's weights + optimiser + EMA bytes per rank (fp32 run) equal what the ranks stored."""
    est = {e.setting.name: e for e in estimate("DiS-T/8", latent=32, channels=1, num_classes=10, gpus=2,
                                               precision="fp32")}[setting]
    for rank_numel in runs[strategy]["numel"]:
        measured = 4 * sum(rank_numel.values())
        print(f"{strategy}: planner {est.weights + est.optimizer + est.ema:.0f} B, measured {measured} B")
        assert est.weights + est.optimizer + est.ema == pytest.approx(measured, rel=0.01)


def test_ddp_and_zero1_replicate_parameters(runs: dict) -> None:
    single = runs["single"]["numel"][0]
    assert [n["params"] for n in runs["ddp"]["numel"]] == [single["params"]] * 2
    assert all(n["params"] == single["params"] for n in runs["zero1"]["numel"])
    assert all(n["ema"] < single["ema"] for n in runs["zero1"]["numel"])  # the EMA is sharded anyway


@pytest.mark.parametrize("run", ["init_fsdp_world4", "init_hsdp_world4", "init_ddp_world4", "init_zero3_world2"])
def test_initial_weights_do_not_depend_on_world_size_or_strategy(runs: dict, run: str) -> None:
    """Built on the meta device, sharded, each rank initialising only its shards: the full
    initial weights are those of the model built whole in one process with the same seed."""
    reference = build_model("DiS-T/8", input_size=32, in_channels=1, num_classes=10, seed=0).state_dict()
    got = runs[run]["model"]
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(got[name], value), name


def test_fsdp_checkpoint_resumes_at_another_world_size(runs: dict) -> None:
    two, one = runs["fsdp"], runs["fsdp_world1"]
    for key in ("model", "ema"):
        for name, value in two[key].items():
            assert torch.equal(one[key][name], value), f"{key} {name}"


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "zero2", "zero3"])
def test_export_loads_anywhere_and_matches_ema(runs: dict, strategy: str, tmp_path: Path) -> None:
    ckpt = CheckpointManager(runs["dirs"] / strategy / "checkpoints", 3).latest()
    weights = export_checkpoint(ckpt, tmp_path / "export")
    assert weights.name == "model.safetensors"
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["name"] == "DiS-T/8" and config["weights"] == "ema"
    model = load_exported(tmp_path / "export")
    reference = build_model("DiS-T/8", input_size=32, in_channels=1, num_classes=10).eval()
    reference.load_state_dict(runs[strategy]["ema"])
    x, t, y = torch.randn(3, 1, 32, 32), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference(x, t, y), rtol=0, atol=0)
    raw = load_exported(export_checkpoint(ckpt, tmp_path / "raw", ema=False).parent)
    torch.testing.assert_close(raw.state_dict(), runs[strategy]["model"], rtol=0, atol=0)


def test_cpu_offload_needs_a_gpu() -> None:
    from dis_dist.distributed.env import DistEnv
    from dis_dist.distributed.fsdp import FSDPStrategy
    from dis_dist.errors import ConfigError

    cfg = load_config(None, ["dist.strategy=fsdp", "dist.cpu_offload=true"])
    model = build_model("DiS-T/8", input_size=32, in_channels=1, num_classes=10)
    with pytest.raises(ConfigError, match="dist.cpu_offload"):
        FSDPStrategy(DistEnv(0, 1, 0, torch.device("cpu")), cfg, model, 1, None, None)
