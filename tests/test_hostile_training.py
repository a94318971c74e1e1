"""Training as a hostile user or a hostile cluster would have it (issue 26): an evaluation that
fails, two jobs on one run directory, a full disk while saving, a crash between a log and a
checkpoint, unusable run directories and build directories, impossible planner inputs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dis_dist.config import load_config
from dis_dist.errors import CheckpointError, DisDistError
from dis_dist.train.checkpoint import CheckpointManager
from dis_dist.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _config(run_dir: Path, fmnist_root: Path, *extra: str):
    return load_config(None, [
        f"run_dir={run_dir}", f"data.root={fmnist_root}", "model.name=DiS-T/8",
        "train.steps=6", "train.global_batch=4", "train.micro_batch=4", "sample.every=0", "sample.num=2",
        "sample.steps=2", "checkpoint.every=3", "log.every=1", *extra,
    ])


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *options: str):
    """A tmpfs of ``size`` mounted at ``path`` (the tests run as root), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- 1. evaluation and sampling never cost training ----------------------------------------------

class _FailingEvaluator:
    """An evaluator whose scoring fails as a NaN reference made it fail (in linalg.eigh)."""

    calls: list[int] = []

    def __init__(self, *args, **kwargs) -> None:
        self.kept = None

    def __call__(self, model, diffusion, collective=False, keep=0):
        import numpy as np

        _FailingEvaluator.calls.append(1)
        np.linalg.eigh(np.full((3, 3), np.nan))  # what a NaN covariance does in the Frechet distance
        raise np.linalg.LinAlgError("Eigenvalues did not converge")


def test_a_failing_evaluation_or_grid_is_logged_and_training_goes_on(tmp_path, fmnist_root, monkeypatch, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import dis_dist.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "Evaluator", _FailingEvaluator)
    seen_at_eval: list[bool] = []
    original_evaluate = Trainer.evaluate

    def evaluate(self, logger):
        seen_at_eval.append(CheckpointManager(self.run_dir / "checkpoints", 9).path_for(self.step).is_dir())
        return original_evaluate(self, logger)

    def broken_grid(self):
        raise RuntimeError("the decoder ran out of memory")

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.setattr(Trainer, "sample_grid", broken_grid)
    cfg = _config(tmp_path, fmnist_root, "eval.every=3", "eval.reference=unused", "sample.every=3")
    result = Trainer(cfg).fit()
    assert result.step == 6  # training ran to its end
    assert [p.name for _, p in CheckpointManager(tmp_path / "checkpoints", 9).complete()] == [
        "step_00000003", "step_00000006"]
    assert seen_at_eval == [True, True]  # each step's checkpoint was written before its evaluation
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any("evaluation at step 3 failed" in m and "LinAlgError" in m for m in failures), failures
    assert any("sample grid at step 3 failed" in m for m in failures), failures
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [e.value for e in events.Scalars("eval/failures")] == [1, 2]
    assert [e.value for e in events.Scalars("samples/failures")] == [1, 2]


# -- 2. one job per run directory ------------------------------------------------------------------

def _lease(run_dir: Path, *, job: str | None, age_s: float, host: str = "node-17", pid: int = 4242) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    path.write_text(json.dumps({"host": host, "pid": pid, "job": job, "token": "theirs",
                                "renewed": time.time() - age_s}))
    return path


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_a_second_job_is_refused_naming_the_holder_and_touches_nothing(tmp_path, fmnist_root, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _lease(tmp_path, job="777", age_s=5)
    before = _tree(tmp_path)
    with pytest.raises(DisDistError, match=r"in use by SLURM job 777 on node-17 \(pid 4242\)"):
        Trainer(_config(tmp_path, fmnist_root)).fit()
    assert _tree(tmp_path) == before


def test_a_stale_lease_or_the_same_slurm_job_takes_over(tmp_path, fmnist_root, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _lease(tmp_path / "stale", job="777", age_s=3600)  # its holder died an hour ago
    assert Trainer(_config(tmp_path / "stale", fmnist_root, "train.steps=1")).fit().step == 1
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the same job, requeued while its lease is fresh
    _lease(tmp_path / "requeued", job="777", age_s=5)
    assert Trainer(_config(tmp_path / "requeued", fmnist_root, "train.steps=1")).fit().step == 1
    assert not (tmp_path / "stale" / "run.lock").exists()  # released at the end


def test_two_jobs_on_one_run_dir_for_real(tmp_path, fmnist_root):
    """A running training job and a second one started on its run_dir: the second exits non-zero
    with one line naming the first (host and pid), and the first trains on, renewing its lease."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SLURM_JOB_ID", None)
    args = [sys.executable, "-m", "dis_dist.train", "--config", str(ROOT / "configs" / "demo_fmnist.yaml"),
            f"run_dir={tmp_path}", f"data.root={fmnist_root}", "data.source=fmnist", "model.name=DiS-T/8",
            "data.image_size=32",
            "train.steps=100000", "log.every=10", "sample.every=0", "eval.every=0", "checkpoint.every=0",
            "checkpoint.lock_lease_s=20"]
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "run.lock"
        deadline = time.time() + 120
        while not lock.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert lock.exists(), "the first job never took the lease"
        renewed = json.loads(lock.read_text())["renewed"]
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"on {socket.gethostname()} (pid {first.pid})" in errors[0], second.stderr
        time.sleep(3)  # the lease is renewed every lock_lease_s / 10 s
        assert first.poll() is None and json.loads(lock.read_text())["renewed"] > renewed
    finally:
        first.kill()
        first.wait()


# -- 5. an unusable build directory for the native scan ---------------------------------------------

@pytest.mark.parametrize("kind", ["read-only", "a file"])
def test_an_unusable_extensions_dir_falls_back_to_chunked(tmp_path, kind):
    target = tmp_path / "ext"
    ctx = _tmpfs(target, "1m", "ro") if kind == "read-only" else contextlib.nullcontext(target)
    if kind == "a file":
        target.write_text("not a directory")
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO);"
            "from dis_dist.ops.selective_scan import resolve_backend;"
            "print('backend', resolve_backend('auto', torch.device('cpu')).name)")
    with ctx:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "TORCH_EXTENSIONS_DIR": str(target), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "backend chunked" in out.stdout
    assert "not cpu:" in out.stderr and str(target) in out.stderr  # the logged reason names the directory


# -- 7. a full disk while saving ------------------------------------------------------------------

def test_a_full_disk_while_saving_is_one_clear_error_and_keeps_the_last_checkpoint(tmp_path, fmnist_root):
    run_dir = tmp_path / "run"
    with _tmpfs(run_dir, "24m"):  # room for one checkpoint of DiS-T/8 (15 MB), not two
        cfg = _config(run_dir, fmnist_root, "checkpoint.keep_last=2")
        with pytest.raises(CheckpointError) as info:
            Trainer(cfg).fit()
        message = str(info.value)
        assert "no space left" in message and "step_00000006" in message and "step_00000003" in message
        assert "\n" not in message
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000003"]  # no leftovers


# -- 8. TensorBoard after a crash and a resume ----------------------------------------------------------

def test_resumed_runs_log_each_step_once(tmp_path, fmnist_root):
    """Steps logged after the last checkpoint and before a crash are logged again by the resumed
    run: TensorBoard shows them once (the resumed writer purges them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(_config(tmp_path, fmnist_root, "train.steps=5")).fit()  # logs 1-5, saves at 3 and 5
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "step_00000005")  # the crash came before the save at 5
    Trainer(_config(tmp_path, fmnist_root, "train.steps=6")).fit()  # resumes at 3, logs 4-6
    steps = [e.step for e in EventAccumulator(str(tmp_path)).Reload().Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]


# -- 9. the planner refuses impossible inputs ----------------------------------------------------

@pytest.mark.parametrize("flag,value", [
    ("--gpus", "0"), ("--gpus", "-8"), ("--gpu-mem", "0"), ("--gpu-mem", "-80"), ("--gpu-mem", "nan"),
    ("--global-batch", "0"), ("--global-batch", "-256"), ("--resolution", "0"), ("--resolution", "-256"),
    ("--resolution", "100"), ("--gpus-per-node", "0"), ("--num-classes", "-1"), ("--context-parallel", "-2"),
])
def test_the_planner_refuses_impossible_inputs(flag, value, capsys):
    from dis_dist.plan import main

    try:
        status = main([flag, value])  # a ConfigError: one line, status 2
    except SystemExit as e:  # argparse's refusal of the flag: one line, status 2
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and flag in err[-1] and "Traceback" not in "".join(err)


# -- 10. --resume of something that is not a checkpoint ---------------------------------------------

def test_resume_of_a_directory_that_is_no_checkpoint_says_so(tmp_path, fmnist_root):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint") as info:
        Trainer(_config(tmp_path / "run", fmnist_root)).fit(resume=str(other))
    assert "cut off" not in str(info.value)


# -- 11. run directories that cannot be used --------------------------------------------------------

def test_a_read_only_run_dir_or_a_file_is_one_line(tmp_path, fmnist_root):
    ro = tmp_path / "ro"
    with _tmpfs(ro, "1m", "ro"):
        with pytest.raises(DisDistError, match="read-only"):
            Trainer(_config(ro, fmnist_root)).fit()
    afile = tmp_path / "file"
    afile.write_text("I am a file")
    with pytest.raises(DisDistError, match="not a directory"):
        Trainer(_config(afile, fmnist_root)).fit()


# -- 1. a reference that evaluation cannot use fails before training, and is not cached ------------

@pytest.mark.parametrize("case", ["nan images", "nan statistics", "too few samples"])
def test_a_reference_evaluation_cannot_use_fails_at_start_and_caches_nothing(
        case, tmp_path, fmnist_root, classifier, monkeypatch):
    import numpy as np

    from dis_dist.errors import DataError

    cache = tmp_path / "cache"
    monkeypatch.setenv("DIS_DIST_CACHE", str(cache))
    reference = tmp_path / "reference.npz"
    samples = "eval.num_samples=16"
    if case == "nan images":  # what passed the start-up check and was cached before
        np.savez(reference, arr_0=np.full((16, 32, 32, 1), np.nan, dtype=np.float32))
    elif case == "nan statistics":
        np.savez(reference, mu=np.full(256, np.nan), sigma=np.eye(256))
    else:  # precision/recall (k = 3) need more than 3 samples
        np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (16, 32, 32, 1), dtype=np.uint8))
        samples = "eval.num_samples=3"
    cfg = _config(tmp_path / "run", fmnist_root, "eval.every=3", f"eval.reference={reference}",
                  "eval.features=fmnist", f"eval.weights={classifier}", samples)
    with pytest.raises(DataError):
        Trainer(cfg)
    if case != "too few samples":  # (there the reference itself is sound: its checked statistics may stay)
        assert not any(cache.rglob("*.npz")), list(cache.rglob("*"))
    assert not (tmp_path / "run").exists()
