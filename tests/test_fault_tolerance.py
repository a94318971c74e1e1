"""Stopping on signals and requests, non-finite steps, checkpoint retention (in one process;
the multi-process and SLURM versions live in test_slurm.py)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from dis_dist.errors import TrainingError
from dis_dist.train.checkpoint import CheckpointManager
from dis_dist.train.preemption import REQUEST_FILE
from dis_dist.train.trainer import Trainer

from .test_trainer import _assert_equal_states, _config, _final_state


def _hook_losses(trainer: Trainer, action) -> None:  # noqa: ANN001
    """Call ``action(step, terms)`` on every micro-batch's loss terms (it may alter them)."""
    original = trainer.diffusion.training_losses

    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        terms = original(*args, **kwargs)
        return action(trainer.step, terms) or terms

    trainer.diffusion.training_losses = wrapped


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fmnist_root):
    """The final state of the uninterrupted run each stopped one is compared with (trained once)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    Trainer(_config(run_dir, fmnist_root, "checkpoint.every=0", "sample.every=0")).fit()
    return _final_state(run_dir)


@pytest.mark.parametrize("how", ["SIGUSR1", "SIGTERM", "file"])
def test_stop_request_saves_and_resume_matches_uninterrupted(tmp_path, fmnist_root, uninterrupted, how):
    stopped = Trainer(_config(tmp_path / "b", fmnist_root, "checkpoint.every=0", "sample.every=0"))

    def request(step, terms):  # noqa: ANN001, ANN202
        if step == 2:
            if how == "file":
                (tmp_path / "b" / REQUEST_FILE).write_text("")
            else:
                os.kill(os.getpid(), getattr(signal, how))

    _hook_losses(stopped, request)
    previous = signal.getsignal(signal.SIGTERM)
    result = stopped.fit()
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert result.step == 3 and result.stopped and result.samples_png is None
    assert [s for s, _ in CheckpointManager(tmp_path / "b" / "checkpoints", 3).complete()] == [3]
    assert not (tmp_path / "b" / REQUEST_FILE).exists()  # handled: a resumed run does not stop

    resumed = Trainer(_config(tmp_path / "b", fmnist_root, "checkpoint.every=0", "sample.every=0")).fit()
    assert resumed.step == 6 and resumed.stopped is None
    (model_a, _), (model_b, _) = uninterrupted, _final_state(tmp_path / "b")
    _assert_equal_states(model_a, model_b)


def test_non_finite_steps_are_skipped_then_stop_training(tmp_path, fmnist_root):
    trainer = Trainer(_config(tmp_path, fmnist_root, "train.steps=20", "checkpoint.every=2", "sample.every=0",
                              "train.max_skipped_in_a_row=3"))
    bad_steps = {2} | set(range(5, 20))

    def poison(step, terms):  # noqa: ANN001, ANN202
        if step in bad_steps:
            terms["loss"] = terms["loss"] * float("nan")

    _hook_losses(trainer, poison)
    # Checkpoints during a streak hold the weights of the last good step: skipped steps change nothing.
    with pytest.raises(TrainingError, match=r"3 steps in a row \(up to step 8\).*step_00000006"):
        trainer.fit()
    assert trainer.skipped_steps == 4  # step 3 (index 2), then steps 6, 7, 8
    state = torch.load(trainer.checkpoints.latest() / "model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert trainer.checkpoints.latest().name == "step_00000006"
    assert all(torch.isfinite(p).all() for p in trainer.strategy.model.parameters())  # never applied


def test_retention_keeps_last_k_and_every_m(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 11):
        manager.save(step, lambda d: None)
    assert [s for s, _ in manager.complete()] == [4, 8, 9, 10]
