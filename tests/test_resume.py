"""What resuming may trust: exact resume with the default settings (label dropout, drop path, the
shard stream with and without workers), checkpoints that never run code, a corrupt newest
checkpoint skipped for the previous one, and a model.json that must match the run."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from dis_dist.errors import CheckpointError
from dis_dist.train.checkpoint import CheckpointManager
from dis_dist.train.trainer import Trainer

from .conftest import write_small_cache
from .test_fault_tolerance import _hook_losses
from .test_trainer import _assert_equal_states, _config


def _model_state(run_dir: Path) -> dict:
    path = CheckpointManager(run_dir / "checkpoints", 3).latest()
    return torch.load(path / "model.pt", weights_only=True)


def _stream(cache: Path, workers: int) -> list[str]:
    return ["data.source=shards", f"data.url={cache}", f"data.num_workers={workers}", "data.shuffle_buffer=64",
            "checkpoint.every=0", "sample.every=0"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_signal_stop_and_resume_is_bit_exact_with_the_defaults(tmp_path, fmnist_cache, fmnist_root, workers):
    """The defaults draw randomness everywhere: label dropout 0.1, drop path 0.1, the stream's
    shuffle and flips. A run stopped by SIGTERM at step 2 and resumed ends bit-identical to an
    uninterrupted one."""
    extra = _stream(fmnist_cache, workers)
    straight = Trainer(_config(tmp_path / "a", fmnist_root, *extra))
    assert straight.cfg.model.class_dropout_prob == 0.1 and straight.cfg.model.drop_path_rate == 0.1
    straight.fit()

    stopped = Trainer(_config(tmp_path / "b", fmnist_root, *extra))
    _hook_losses(stopped, lambda step, terms: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None)
    assert stopped.fit().stopped == "SIGTERM"
    resumed = Trainer(_config(tmp_path / "b", fmnist_root, *extra)).fit()
    assert resumed.step == 6
    _assert_equal_states(_model_state(tmp_path / "a"), _model_state(tmp_path / "b"))


class _Payload:
    """A pickle that creates a file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return open, (str(self.marker), "w")


def _plant(checkpoint: Path, marker: Path) -> list[Path]:
    """Replace every file a checkpoint may unpickle with a payload (and add the old names)."""
    planted = [p for p in checkpoint.rglob("*") if p.is_file() and p.suffix in (".pt", ".distcp", ".metadata")]
    planted += [checkpoint / "trainer.pt", checkpoint / "rng_rank0.pt"]
    for path in planted:
        torch.save({"model": _Payload(marker), "step": 1}, path)
    return planted


def _short(run_dir: Path, root: Path, steps: int, *extra: str):  # noqa: ANN202
    return _config(run_dir, root, f"train.steps={steps}", "checkpoint.every=2", "sample.every=0", *extra)


def test_planted_trainer_and_rng_files_never_run(tmp_path, fmnist_root):
    """The files where earlier versions kept the trainer state and RNG states, planted."""
    run = tmp_path / "run"
    Trainer(_short(run, fmnist_root, 2)).fit()
    marker = tmp_path / "payload-ran"
    newest = run / "checkpoints" / "step_00000002"
    for name in ("trainer.pt", "rng_rank0.pt"):
        torch.save({"step": _Payload(marker)}, newest / name)
    Trainer(_short(run, fmnist_root, 3)).fit(resume="auto")
    assert not marker.exists()


def test_a_planted_checkpoint_never_runs_code(tmp_path, fmnist_root, caplog):
    run = tmp_path / "run"
    Trainer(_short(run, fmnist_root, 4)).fit()
    marker = tmp_path / "payload-ran"
    newest = run / "checkpoints" / "step_00000004"
    _plant(newest, marker)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(_short(run, fmnist_root, 5))
        ckpt = trainer._resume("auto")
    assert not marker.exists()
    assert ckpt.name == "step_00000002" and trainer.step == 2  # the newest was skipped
    assert "step_00000004" in caplog.text and "model.pt" in caplog.text
    with pytest.raises(CheckpointError, match=r"step_00000004/model\.pt"):
        Trainer(_short(run, fmnist_root, 5)).fit(resume=str(newest))
    assert not marker.exists()


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, fmnist_root, caplog):
    run = tmp_path / "run"
    Trainer(_short(run, fmnist_root, 4)).fit()
    weights = run / "checkpoints" / "step_00000004" / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level(logging.INFO):
        result = Trainer(_short(run, fmnist_root, 6)).fit(resume="auto")
    assert result.step == 6
    assert "skipping checkpoint" in caplog.text and str(weights) in caplog.text
    assert "resumed from" in caplog.text and "step_00000002" in caplog.text


def test_no_loadable_checkpoint_left_is_an_error(tmp_path, fmnist_root):
    run = tmp_path / "run"
    Trainer(_short(run, fmnist_root, 4)).fit()
    for step in (2, 4):
        weights = run / "checkpoints" / f"step_{step:08d}" / "model.pt"
        weights.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        Trainer(_short(run, fmnist_root, 6)).fit(resume="auto")


def test_resume_compares_the_whole_model_json(tmp_path, fmnist_root):
    """A run dir trained on Fashion-MNIST (1 channel, 32 px, 10 classes), resumed on a cache of
    2-channel 8 px latents of 3 classes with the same model name."""
    run = tmp_path / "run"
    Trainer(_short(run, fmnist_root, 2)).fit()
    cache = write_small_cache(tmp_path / "cache", channels=2, size=8, classes=3)
    other = _short(run, fmnist_root, 4, "data.source=shards", f"data.url={cache}", "data.image_size=8",
                   "data.num_workers=0")
    with pytest.raises(CheckpointError) as e:
        Trainer(other).fit(resume="auto")
    for key, saved, current in [("in_channels", 1, 2), ("num_classes", 10, 3), ("input_size", 32, 8)]:
        assert f"{key}: checkpoint {saved}, this run {current}" in str(e.value)
    assert "class_names: checkpoint ['T-shirt/top'" in str(e.value)


def test_every_loader_reads_data_only(tmp_path):
    """The loaders behind every checkpoint format refuse a code-running pickle with a
    CheckpointError naming the file: torch files, torch.load inside DeepSpeed (which asks for
    weights_only=False), DCP's metadata and DCP's non-tensor items."""
    import io
    import pickle

    from dis_dist.utils.safe_load import DataOnlyPlanner, DataOnlyReader, load_torch, torch_load_as_data

    marker = tmp_path / "payload-ran"
    file = tmp_path / "planted.pt"
    torch.save({"weights": _Payload(marker)}, file)
    with pytest.raises(CheckpointError, match=r"planted\.pt cannot be loaded .*Unsupported global"):
        load_torch(file)
    original = torch.load
    with torch_load_as_data(), pytest.raises(CheckpointError, match=r"planted\.pt"):
        torch.load(file, map_location="cpu", weights_only=False)
    assert torch.load is original
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"dcp/\.metadata is not plain DCP metadata"):
        DataOnlyReader(str(tmp_path / "dcp")).read_metadata()
    with pytest.raises(CheckpointError, match="an in-memory item"):
        DataOnlyPlanner().load_bytes(None, io.BytesIO(file.read_bytes()))
    assert not marker.exists()
    assert load_torch(_saved(tmp_path, {"x": torch.ones(2), "n": [1, "a", None]}))["n"] == [1, "a", None]


def _saved(tmp_path: Path, obj: object) -> Path:
    path = tmp_path / "plain.pt"
    torch.save(obj, path)
    return path


def test_a_marker_listing_files_outside_the_checkpoint_is_refused(tmp_path):
    from dis_dist.train.checkpoint import MARKER, verify_checkpoint

    (tmp_path / "outside.pt").write_bytes(b"x")
    checkpoint = tmp_path / "step_00000001"
    checkpoint.mkdir()
    (checkpoint / MARKER).write_text(json.dumps({"step": 1, "files": {"../outside.pt": 1}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        verify_checkpoint(checkpoint)
