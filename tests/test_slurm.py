"""``slurm/train_dis_h.sbatch`` on a real one-node SLURM cluster (tools/local_slurm.sh, started
here when the tests run as root): a plain run, a requeue in the middle of training, a rank
killed with SIGKILL, all with 2 CPU processes (gloo) and a tiny config; and shellcheck.

The preemption timings (signal -> checkpoint saved -> training running again) are printed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("DIS_SLURM_STATE", "/tmp/dis_dist_slurm"))
STEPS = 300

pytestmark = pytest.mark.slow


def test_shell_scripts_pass_shellcheck() -> None:
    require(shutil.which("shellcheck") is not None, "shellcheck (apt-get install shellcheck)")
    scripts = sorted([*ROOT.glob("slurm/*.sbatch"), *ROOT.glob("tools/*.sh")])
    assert scripts
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """The environment in which sbatch and friends reach the local cluster."""
    conf = STATE / "slurm.conf"
    script = str(ROOT / "tools" / "local_slurm.sh")
    started = False
    if os.geteuid() == 0:
        was_running = subprocess.run([script, "status"], capture_output=True).returncode == 0
        proc = subprocess.run([script, "start"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        started = not was_running
    require(conf.is_file() and shutil.which("sbatch") is not None,
            "a SLURM cluster (run the tests as root, or start tools/local_slurm.sh as root)")
    yield {**os.environ, "SLURM_CONF": str(conf)}
    if started:
        subprocess.run([script, "stop"], capture_output=True)


def _tiny_config(path: Path, run_dir: Path, fmnist_root: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "run_dir": str(run_dir),
        "model": {"name": "DiS-T/8", "class_dropout_prob": 0.0, "drop_path_rate": 0.0},
        "data": {"source": "fmnist", "root": str(fmnist_root)},
        "train": {"steps": STEPS, "global_batch": 16, "micro_batch": 8, "ema_decay": 0.9},
        "optim": {"lr": 1.0e-3},
        "sample": {"every": 0, "num": 4, "steps": "2"},
        "checkpoint": {"every": 20, "keep_last": 2},
        "log": {"every": 20},
        "dist": {"strategy": "ddp"},
    }))
    return path


def _submit(env: dict[str, str], workdir: Path, config: Path) -> str:
    job_env = {**env, "CONFIG": str(config), "VENV": str(Path(sys.executable).parents[1]), "NPROC_PER_NODE": "2",
               "PYTHONPATH": str(ROOT), "MAX_RESTARTS": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=15",
         str(ROOT / "slurm" / "train_dis_h.sbatch")],
        cwd=workdir, env=job_env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _wait(env: dict[str, str], job: str, states: set[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(env, job)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} not in {states} after {timeout} s: {_job(env, job)}")


def _wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "COMPLETE").is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    state = torch.load(final / "model.pt", weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def _checkpoints(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "COMPLETE").is_file())


@pytest.fixture(scope="module")
def straight(slurm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> Path:
    """An uninterrupted sbatch run: the reference for the interrupted ones."""
    tmp = tmp_path_factory.mktemp("slurm_straight")
    run_dir = tmp / "run"
    job = _submit(slurm_env, tmp, _tiny_config(tmp / "tiny.yaml", run_dir, fmnist_root))
    info = _wait(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 300)
    assert info["JobState"] == "COMPLETED", (info, (tmp / f"slurm-dis-h2-{job}.out").read_text())
    return run_dir


def test_sbatch_trains_and_leaves_events_and_checkpoints(straight: Path) -> None:
    assert _checkpoints(straight)[-1] == STEPS
    assert list(straight.glob("events.out.tfevents.*"))
    assert (straight / "samples.png").is_file()
    assert list((straight / "logs").glob("*-node0.log"))


def test_sbatch_samples_like_one_local_process(straight: Path, slurm_env: dict[str, str], tmp_path: Path) -> None:
    """slurm/sample.sbatch with 2 processes draws exactly the samples of one local process."""
    args = ["--batch-size", "4", "--steps", "3", "--cfg-scale", "1.5"]
    job_env = {**slurm_env, "MODEL": str(straight), "OUT": str(tmp_path / "cluster"), "NUM_SAMPLES": "10",
               "ARGS": " ".join(args), "VENV": str(Path(sys.executable).parents[1]), "NPROC_PER_NODE": "2",
               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=10",
         str(ROOT / "slurm" / "sample.sbatch")],
        cwd=tmp_path, env=job_env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    local = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sample.py"), str(straight), "--out", str(tmp_path / "local"),
         "--num-samples", "10", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    info = _wait(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 300)
    log = tmp_path / f"slurm-dis-sample-{job}.out"
    assert info["JobState"] == "COMPLETED", (info, log.read_text() if log.is_file() else "")
    cluster, alone = (np.load(tmp_path / d / "samples.npz") for d in ("cluster", "local"))
    assert cluster["arr_0"].shape == (10, 32, 32, 3)
    assert np.array_equal(cluster["arr_0"], alone["arr_0"]) and np.array_equal(cluster["arr_1"], alone["arr_1"])


@pytest.mark.parametrize("how", ["requeue", "usr1"])
def test_preemption_mid_training_resumes_to_the_same_weights(
    slurm_env: dict[str, str], straight: Path, tmp_path: Path, fmnist_root: Path, how: str
) -> None:
    """``scontrol requeue`` (SIGTERM to every process; SLURM requeues) and SLURM's warning signal
    (USR1 to the batch script, which asks training to stop and requeues the job itself)."""
    run_dir = tmp_path / "run"
    job = _submit(slurm_env, tmp_path, _tiny_config(tmp_path / "tiny.yaml", run_dir, fmnist_root))
    _wait_for(lambda: 40 in _checkpoints(run_dir), 240, "the first checkpoints")
    signalled = time.time()
    if how == "requeue":
        subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True)
    else:
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True)
    log = run_dir / "logs" / f"{job}-node0.log"
    expected = "SIGTERM" if how == "requeue" else "request file"
    stopped = _wait_for(lambda: re.search(rf"stopped at step (\d+) \({expected}", log.read_text()), 60,
                        f"training to save and stop ({how})")
    saved_step = int(stopped.group(1))
    saved = (run_dir / "checkpoints" / f"step_{saved_step:08d}" / "COMPLETE").stat().st_mtime
    resumed_line = _wait_for(lambda: re.search(r"(\d\d:\d\d:\d\d) INFO dis_dist.train: resumed from .*step_(\d+) at",
                                               log.read_text()), 180, "the requeued job to resume")
    info = _wait(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    assert info["JobState"] == "COMPLETED" and int(info.get("Restarts", "0")) >= 1, info
    assert int(resumed_line.group(2)) == saved_step  # no step lost: it resumed where it stopped
    running = time.mktime(time.strptime(time.strftime("%Y-%m-%d ", time.localtime(saved)) + resumed_line.group(1),
                                        "%Y-%m-%d %H:%M:%S"))
    print(f"\npreemption ({how}): signal -> saved {saved - signalled:.1f} s "
          f"(step {saved_step}), saved -> running again {running - saved:.1f} s, steps lost 0")
    final, reference = _final_weights(run_dir), _final_weights(straight)
    for name, value in reference.items():
        assert torch.equal(final[name], value), name


def test_killed_rank_restarts_from_the_last_checkpoint(
    slurm_env: dict[str, str], straight: Path, tmp_path: Path, fmnist_root: Path
) -> None:
    run_dir = tmp_path / "run"
    job = _submit(slurm_env, tmp_path, _tiny_config(tmp_path / "tiny.yaml", run_dir, fmnist_root))
    _wait_for(lambda: 40 in _checkpoints(run_dir), 240, "the first checkpoints")
    victim = _wait_for(lambda: _worker_pid(rank=1), 30, "rank 1's process")
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    info = _wait(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    log = (run_dir / "logs" / f"{job}-node0.log").read_text()
    assert info["JobState"] == "COMPLETED", (info, log[-3000:])
    resumed = re.findall(r"resumed from .*step_(\d+) at step", log)
    assert resumed, log[-3000:]
    print(f"\nSIGKILL of rank 1: resumed from step {resumed[-1]}, job done {time.time() - killed:.1f} s after the kill")
    final, reference = _final_weights(run_dir), _final_weights(straight)
    for name, value in reference.items():
        assert torch.equal(final[name], value), name


def _worker_pid(rank: int) -> int | None:
    """A training worker of this machine's job (a torchrun child) with RANK=rank."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dis_dist.train" in cmd and b"torch.distributed.run" not in cmd and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_submitit_preemption_resumes_to_the_same_weights(
    slurm_env: dict[str, str], straight: Path, tmp_path: Path, fmnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(importlib.util.find_spec("submitit") is not None, "submitit (pip install submitit)")
    from dis_dist.launch import submit

    for key, value in {"SLURM_CONF": slurm_env["SLURM_CONF"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    config = _tiny_config(tmp_path / "tiny.yaml", run_dir, fmnist_root)
    # timeout_min >= 60: submitit counts any USR2 in a shorter job as a timeout.
    job = submit(str(config), [], nodes=1, gpus_per_node=0, nproc_per_node=2, cpus_per_task=1, timeout_min=60,
                 cluster="slurm", folder=tmp_path / "submitit")
    _wait_for(lambda: 40 in _checkpoints(run_dir), 240, "the first checkpoints")
    job._interrupt()  # preemption: SIGTERM, then USR2
    results = job.results()
    assert [r["step"] for r in results] == [STEPS, STEPS], results
    info = _wait(slurm_env, job.job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 120)
    assert info["JobState"] == "COMPLETED" and int(info.get("Restarts", "0")) >= 1, info
    log = "".join(f.read_text() for f in (tmp_path / "submitit").rglob("*.err"))
    assert re.search(r"stopped at step \d+ \(SIG", log), log[-3000:]  # saved before requeueing
    final, reference = _final_weights(run_dir), _final_weights(straight)
    for name, value in reference.items():
        assert torch.equal(final[name], value), name


HANG = """
import sys, time, torch, torch.distributed as dist
from dis_dist.dist.env import init_distributed
env = init_distributed("ddp", "cpu", timeout_min=float(sys.argv[1]))
if env.rank == 1:
    time.sleep(120)  # never joins the collective
dist.all_reduce(torch.ones(1))
"""


def test_a_hung_collective_fails_within_the_timeout(tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "0.1"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=150,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "Timed out" in proc.stderr or "timed out" in proc.stderr.lower(), proc.stderr[-3000:]
    assert elapsed < 100  # the 6 s collective timeout, not rank 1's 120 s sleep
