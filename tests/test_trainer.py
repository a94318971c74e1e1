"""The single-device trainer: exact resume, checkpoints, accumulation, TensorBoard output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dis_dist.config import load_config
from dis_dist.errors import CheckpointError
from dis_dist.train.checkpoint import MARKER, CheckpointManager, resolve_resume
from dis_dist.train.optim import ema_decay_at, lr_factor
from dis_dist.train.trainer import Trainer


def _config(run_dir, fmnist_root, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", f"data.root={fmnist_root}", "model.name=DiS-T/8",
        "train.steps=6", "train.global_batch=8", "train.micro_batch=4", "train.ema_decay=0.9",
        "optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=cosine",
        "sample.every=3", "sample.num=4", "sample.steps=2", "checkpoint.every=3", "log.every=1",
        *extra,
    ])


def _final_state(run_dir):
    path = CheckpointManager(run_dir / "checkpoints", 3).latest()
    return torch.load(path / "model.pt", weights_only=True), json.loads((path / "trainer.json").read_text())


def _assert_equal_states(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal_states(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal_states(x, y)
    else:
        assert a == b


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path, fmnist_root):
    straight = Trainer(_config(tmp_path / "a", fmnist_root)).fit()
    assert straight.step == 6
    stopped = Trainer(_config(tmp_path / "b", fmnist_root)).fit(stop_at_step=3)
    assert stopped.step == 3 and stopped.samples_png is None
    resumed = Trainer(_config(tmp_path / "b", fmnist_root)).fit(resume="auto")
    assert resumed.step == 6
    (model_a, trainer_a), (model_b, trainer_b) = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    _assert_equal_states(model_a, model_b)  # weights, EMA and AdamW moments, bit for bit
    _assert_equal_states(trainer_a, trainer_b)
    assert straight.final_loss == resumed.final_loss
    # Training moved the weights and the EMA trails them.
    first = Trainer(_config(tmp_path / "c", fmnist_root)).strategy.model.state_dict()
    moved = [k for k in first if not torch.equal(first[k], model_a["model"][k])]
    assert len(moved) > len(first) // 2
    assert not torch.equal(model_a["ema"]["pos_embed"], model_a["model"]["pos_embed"])


def test_sample_num_zero_draws_no_grid(tmp_path, fmnist_root):
    result = Trainer(_config(tmp_path, fmnist_root, "train.steps=1", "sample.every=0", "sample.num=0")).fit()
    assert result.step == 1 and result.samples_png is None and not (tmp_path / "samples.png").exists()


def test_tensorboard_holds_scalars_images_and_config(tmp_path, fmnist_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = Trainer(_config(tmp_path, fmnist_root, "train.steps=3")).fit()
    assert result.samples_png == tmp_path / "samples.png" and result.samples_png.is_file()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for tag in ["train/loss", "train/loss_mse", "train/loss_vb", "train/lr", "train/grad_norm",
                "perf/images_per_sec", "perf/step_time_s", "perf/data_wait_s", "perf/peak_memory_gb"]:
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[0]  # warm-up then cosine
    assert "samples/ema" in tags["images"]
    assert [e.step for e in events.Images("samples/ema")] == [3]  # once at step 3, reused at the end
    assert "config/text_summary" in tags["tensors"]
    assert (tmp_path / "config.yaml").is_file()


def test_gradient_accumulation_steps_the_optimizer_once(tmp_path, fmnist_root):
    trainer = Trainer(_config(tmp_path, fmnist_root, "train.steps=2", "train.global_batch=12",
                              "sample.every=0"))
    assert trainer.accum == 3
    trainer.fit()
    state = trainer.strategy.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {2}


def test_resume_refuses_another_model(tmp_path, fmnist_root):
    Trainer(_config(tmp_path, fmnist_root, "train.steps=1", "sample.every=0")).fit()
    other = Trainer(_config(tmp_path, fmnist_root, "model.name=DiS-T/4", "sample.every=0"))
    with pytest.raises(CheckpointError, match="name: checkpoint 'DiS-T/8', this run 'DiS-T/4'"):
        other.fit(resume="auto")


def test_checkpoint_manager_keeps_complete_ones(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, lambda d, s=step: (d / "x").write_text(str(s)))
    assert [s for s, _ in manager.complete()] == [2, 3]
    (tmp_path / "step_00000004").mkdir()  # cut off mid-write: no marker
    (tmp_path / ".tmp_step_00000005").mkdir()
    assert manager.latest() == tmp_path / "step_00000003"
    manager.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    assert (manager.latest() / MARKER).is_file()
    assert resolve_resume("none", manager) is None
    assert resolve_resume("auto", manager) == tmp_path / "step_00000003"
    (tmp_path / "step_00000009").mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(tmp_path / "step_00000009"), manager)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing"), manager)


def test_checkpoint_manager_completes_an_async_save_later(tmp_path):
    from concurrent.futures import Future

    manager = CheckpointManager(tmp_path, keep_last=3)
    future: Future = Future()
    manager.save(1, lambda d: future)
    assert manager.latest() is None  # still being written
    future.set_result(None)
    manager.save(2, lambda d: None)  # completes step 1 first
    assert [s for s, _ in manager.complete()] == [1, 2]
    pending: Future = Future()
    manager.save(3, lambda d: pending)
    pending.set_result(None)
    manager.finish()
    assert [s for s, _ in manager.complete()] == [1, 2, 3]


def test_schedules():
    assert [lr_factor(s, warmup=4, total=10, schedule="constant") for s in (0, 3, 4, 9)] == [0.25, 1, 1, 1]
    assert lr_factor(4, warmup=4, total=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(10, warmup=4, total=10, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert ema_decay_at(0.9999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(0.9999, 10**6, warmup=True) == 0.9999
    assert ema_decay_at(0.9999, 0, warmup=False) == 0.9999


@pytest.mark.slow
def test_a_grid_due_with_an_evaluation_is_its_first_samples(tmp_path, fmnist_root, classifier, monkeypatch):
    """At a step with both, the evaluation runs first and keeps its first sample.num images for
    the grid (the same settings and sample indices): the grid is not drawn again, and it is the
    grid sample_grid draws."""
    import numpy as np

    drawn: list[int] = []
    real_grid = Trainer.sample_grid

    def counting_grid(self):
        drawn.append(self.step)
        return real_grid(self)

    monkeypatch.setattr(Trainer, "sample_grid", counting_grid)
    cfg = _config(tmp_path, fmnist_root, "train.steps=4", "sample.every=2", "sample.batch_size=4",
                  "eval.every=4", "eval.num_samples=6", "eval.features=fmnist", f"eval.weights={classifier}",
                  f"eval.reference={fmnist_root}")
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.step == 4 and set(result.metrics) >= {"fd", "accuracy"}
    assert drawn == [2]  # step 2: the grid alone; step 4: the evaluation's first 4 samples
    assert trainer.done.grid_step == 4 and result.samples_png.is_file()
    assert np.array_equal(trainer.done.grid, real_grid(trainer))


def test_cli_trains_and_resumes(tmp_path, fmnist_root, classifier):
    import subprocess
    import sys

    args = [
        sys.executable, "-m", "dis_dist.train", "--config", "configs/demo_fmnist.yaml",
        f"run_dir={tmp_path}", "data.source=fmnist", f"data.root={fmnist_root}", "train.steps=2",
        "train.global_batch=4",
        "train.micro_batch=4", "sample.num=10", "sample.steps=2", "log.every=1",
        f"eval.weights={classifier}", f"eval.reference={fmnist_root}", "eval.num_samples=10",
    ]
    root = Path(__file__).resolve().parents[1]
    first = subprocess.run(args, capture_output=True, text=True, cwd=root)
    assert first.returncode == 0, first.stderr
    assert f"samples: {tmp_path / 'samples.png'}" in first.stdout and (tmp_path / "samples.png").is_file()
    assert "step 2/2 | loss" in first.stderr
    # The demo's evaluation at the end, printed last (as `make demo` shows it).
    assert "evaluation of 10 EMA samples" in first.stdout and "conditional accuracy: " in first.stdout
    again = subprocess.run([*args, "train.steps=3"], capture_output=True, text=True, cwd=root)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and "step 3/3" in again.stderr
