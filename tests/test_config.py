"""Config loading, overrides and every class of config error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dis_dist.config import (
    config_from_dict,
    grad_accumulation,
    load_config,
    save_config,
    to_dict,
    validate,
)
from dis_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_typed():
    cfg = load_config(None, ["train.steps=12", "optim.lr=1e-3", "model.name=DiS-H/2", "optim.betas=[0.9, 0.95]",
                             "train.ema_warmup=true", "sample.steps=ddim25"])
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads "1e-3" as a string
    assert cfg.model.name == "DiS-H/2" and cfg.optim.betas == [0.9, 0.95]
    assert cfg.train.ema_warmup is True and cfg.sample.steps == "ddim25"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: /tmp/x\ntrain:\n  steps: 5\n  micro_batch: 8\n  global_batch: 16\n")
    cfg = load_config(path, ["train.steps=7"])
    assert (cfg.run_dir, cfg.train.steps, cfg.train.micro_batch) == ("/tmp/x", 7, 8)
    assert grad_accumulation(cfg, 1) == 2 and grad_accumulation(cfg, 2) == 1


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=3", "optim.schedule=cosine"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(config_from_dict(to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (["train.stpes=3"], r"unknown config key 'train.stpes'; did you mean 'steps'"),
        (["trian.steps=3"], r"unknown config key 'trian'.*valid keys: run_dir, model"),
        (["train.steps=abc"], r"train.steps: expected an integer"),
        (["train.steps=1.5"], r"train.steps: expected an integer"),
        (["train.ema_warmup=maybe"], r"train.ema_warmup: expected true or false"),
        (["optim.lr=fast"], r"optim.lr: expected a number"),
        (["optim.betas=0.9"], r"optim.betas: expected a list"),
        (["train.precision=fp8"], r"train.precision: 'fp8' is not valid; choose one of: fp32, bf16"),
        (["optim.schedule=linear"], r"choose one of: constant, cosine"),
        (["model.name=DiS-Z/2"], r"unknown model 'DiS-Z/2'; choose one of: DiS-T/2"),
        (["model.name=DiS-S/8", "data.image_size=28"], r"data.image_size=28 is not divisible by the patch size 8"),
        (["train.global_batch=10", "train.micro_batch=4"], r"global_batch=10 is not divisible by"),
        (["train.steps=0"], r"train.steps must be positive"),
        (["optim.warmup_steps=-1"], r"optim.warmup_steps must be >= 0"),
        (["train.ema_decay=1.0"], r"train.ema_decay must be in \[0, 1\)"),
        (["optim.betas=[0.9]"], r"optim.betas must be two numbers"),
        (["sample.steps=fast"], r"timestep respacing 'fast'"),
        (["sample.steps=2000"], r"cannot divide a section"),
        (["train=3"], r"train: expected a mapping"),
        (["train.steps"], r"not of the form section.key=value"),
        (["train.steps.x=1"], r"train.steps: expected an integer, got \{'x': 1\}"),
        (["train.steps=3", "train.steps.x=1"], r"'steps' is a value, not a section"),
    ],
)
def test_config_errors_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_world_size_divisibility():
    cfg = load_config(None, ["train.global_batch=32", "train.micro_batch=8", "dist.strategy=ddp"])
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"data-parallel ranks \(world size / dist.context_parallel\) = 8 x 3"):
        validate(cfg, world_size=3)


@pytest.mark.parametrize("overrides,world_size,message", [
    (["dist.strategy=single"], 2, "choose one of: ddp, fsdp, deepspeed"),
    (["dist.strategy=fsdp", "dist.shard_group_size=3"], 4, "dist.shard_group_size=3 must be 0"),
    (["dist.strategy=deepspeed", "dist.zero_stage=4"], 1, "dist.zero_stage must be 1, 2 or 3"),
    (["dist.deepspeed_config=/nope.json"], 1, "dist.deepspeed_config"),
    (["dist.timeout_min=0"], 1, "dist.timeout_min must be positive"),
    (["train.activation_checkpointing=-1"], 1, "train.activation_checkpointing must be >= 0"),
    (["dist.strategy=horovod"], 1, "choose one of: single, ddp, fsdp, deepspeed"),
    (["checkpoint.async_save=true", "dist.strategy=ddp"], 1, "checkpoint.async_save needs dist.strategy='fsdp'"),
    (["dist.strategy=fsdp", "dist.context_parallel=0"], 2, "dist.context_parallel must be >= 1"),
    (["dist.strategy=deepspeed", "dist.context_parallel=2"], 2, "needs dist.strategy 'fsdp' or 'ddp'"),
    (["dist.strategy=fsdp", "dist.context_parallel=3"], 4, "dist.context_parallel=3 must divide the world size 4"),
    (["dist.strategy=fsdp", "dist.context_parallel=2"], 4, r"= 256 x 2"),
])
def test_distributed_settings_are_checked(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, overrides), world_size=world_size)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_config_errors_before_any_work():
    result = subprocess.run(
        [sys.executable, "-m", "dis_dist.train", "train.micro_batch=0"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "error: train.micro_batch must be positive" in result.stderr
    assert "Traceback" not in result.stderr


def test_ranks_from_torchrun_and_slurm():
    from dis_dist.distributed.env import first_host, ranks_from_env

    assert first_host("gpu[003-005,010],cpu1") == "gpu003"
    assert first_host("node7") == "node7"
    assert first_host("a[1,4]") == "a1"
    assert ranks_from_env({}) is None
    torchrun = ranks_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                               "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert torchrun == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    slurm = ranks_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
                            "SLURM_JOB_NODELIST": "gpu[010-011]", "SLURM_JOB_ID": "4242"})
    assert slurm == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                     "MASTER_ADDR": "gpu010", "MASTER_PORT": str(29500 + 242)}
    assert ranks_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # a lone task


def test_torchrun_port_zero_is_an_error_not_a_hang(monkeypatch):
    """torchrun --master_port=0 binds a free port but gives its workers MASTER_PORT=0."""
    import datetime

    from dis_dist.distributed.env import _agent_store

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--standalone"):
        _agent_store(datetime.timedelta(seconds=5))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    validate(cfg, world_size=1 if cfg.dist.strategy == "single" else 8)
    if cfg.dist.deepspeed_config:
        from dis_dist.distributed.zero import deepspeed_config

        ds = deepspeed_config(cfg, accum=2)
        assert ds["zero_optimization"]["stage"] == cfg.dist.zero_stage and ds["train_batch_size"] == 256


def test_deepspeed_passthrough_cannot_override_the_run_config(tmp_path):
    from dis_dist.distributed.zero import deepspeed_config

    passthrough = tmp_path / "ds.json"
    passthrough.write_text('{"zero_optimization": {"overlap_comm": true}, "gradient_clipping": 5.0}')
    cfg = load_config(None, ["dist.strategy=deepspeed", f"dist.deepspeed_config={passthrough}"])
    with pytest.raises(ConfigError, match="'gradient_clipping', which comes from optim.grad_clip"):
        deepspeed_config(cfg, accum=1)
    passthrough.write_text('{"zero_optimization": {"overlap_comm": true, "stage": 3}}')
    with pytest.raises(ConfigError, match="set the stage in one place"):
        deepspeed_config(cfg, accum=1)
    passthrough.write_text('{"zero_optimization": {"overlap_comm": true}}')
    merged = deepspeed_config(cfg, accum=1)["zero_optimization"]
    assert merged["overlap_comm"] is True and merged["stage"] == 2


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")))
def test_shipped_deepspeed_files_merge(path):
    from dis_dist.distributed.zero import deepspeed_config

    stage = int(path.stem[-1])
    cfg = load_config(None, ["dist.strategy=deepspeed", f"dist.zero_stage={stage}", f"dist.deepspeed_config={path}"])
    assert deepspeed_config(cfg, accum=1)["zero_optimization"]["stage"] == stage


def test_a_one_step_sampler_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="at least 2 steps"):
        load_config(None, ["sample.steps=1"])
