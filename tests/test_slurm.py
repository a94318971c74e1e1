"""SLURM on a 2-node cluster on this machine (``tools/local_slurm.sh start --nodes 2``, started
here when the tests run as root). node1 and node2 are slurmd daemons in network, UTS and mount
namespaces of their own (dis-node1/2, addresses 10.177.0.2/3 on a bridge, no route elsewhere),
so srun, torchrun's c10d rendezvous and gloo really cross hosts. DiS-T with 2 CPU processes
(gloo) per node:

- ``sbatch --nodes=2 slurm/train_dis_h.sbatch``: ranks 0-1 run on node1, 2-3 on node2; the
  weights are bit-identical to a local ``torchrun --standalone --nproc_per_node=4`` and within
  1e-5 of one process on the same global batch;
- ``slurm/sample.sbatch`` over both nodes draws exactly the samples of one local process;
- preemption of a 2-node job (``scontrol requeue``: SIGTERM everywhere; SLURM's USR1 warning to
  the batch script): one save, requeue, resume, the same final weights;
- ``python -m dis_dist.launch --nodes 2`` (submitit): the same weights as sbatch;
- ``slurm/encode_latents.sbatch`` as a 2-task array, one task per node: one manifest whose
  sha256 values are the shards';
- node2 lost mid-run (its slurmd and every process in it SIGKILLed): SLURM marks it DOWN and
  requeues the job, which runs again once the node is back and resumes from the newest
  checkpoint that was complete before the loss, to the same final weights;
and shellcheck, and a hung collective that fails within ``dist.timeout_min``.

Timings (rendezvous, signal -> save, requeue -> training, node loss -> resumed) are printed:
``pytest -s``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("DIS_SLURM_STATE", "/tmp/dis_dist_slurm"))
SCRIPT = str(ROOT / "tools" / "local_slurm.sh")
NODES = ("node1", "node2")
NAMESPACES = {"node1": "dis-node1", "node2": "dis-node2"}  # tools/local_slurm.sh's names
STEPS = 24
EVERY = 4  # checkpoint interval
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

pytestmark = pytest.mark.slow


def test_shell_scripts_pass_shellcheck() -> None:
    require(shutil.which("shellcheck") is not None, "shellcheck (apt-get install shellcheck)")
    scripts = sorted([*ROOT.glob("slurm/*.sbatch"), *ROOT.glob("tools/*.sh")])
    assert scripts
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """The environment in which sbatch and friends reach the local 2-node cluster."""
    conf = STATE / "slurm.conf"
    started = False
    if os.geteuid() == 0:
        was_running = subprocess.run([SCRIPT, "status"], capture_output=True).returncode == 0
        proc = subprocess.run([SCRIPT, "start", "--nodes", str(len(NODES))], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        started = not was_running
    require(conf.is_file() and shutil.which("sbatch") is not None,
            "a SLURM cluster (run the tests as root, or start tools/local_slurm.sh start --nodes 2 as root)")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], env=env, capture_output=True, text=True).stdout.split()
    require(tuple(nodes) == NODES, f"the 2-node cluster of tools/local_slurm.sh (found nodes {nodes})")
    yield env
    if started:
        subprocess.run([SCRIPT, "stop"], capture_output=True)


def _root() -> None:
    require(os.geteuid() == 0, "root (the nodes are network namespaces)")


def _tiny_config(path: Path, run_dir: Path, fmnist_root: Path) -> Path:
    # Global batch 8 = 2 per rank on 4 ranks; a single process accumulates the same 4 micro-batches.
    path.write_text(yaml.safe_dump({
        "run_dir": str(run_dir),
        "model": {"name": "DiS-T/8", "class_dropout_prob": 0.0, "drop_path_rate": 0.0},
        "data": {"source": "fmnist", "root": str(fmnist_root)},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "ema_decay": 0.9},
        "optim": {"lr": 1.0e-3},
        "sample": {"every": 0, "num": 4, "steps": "2"},
        "checkpoint": {"every": EVERY, "keep_last": 2},
        "log": {"every": 1},  # a line per step: when the first one ran, and the resumed ones
        "dist": {"strategy": "ddp"},
    }))
    return path


def _job_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    # LOGLEVEL=INFO: torchrun logs its rendezvous result (ranks, master address).
    return {**env, "VENV": str(Path(sys.executable).parents[1]), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "LOGLEVEL": "INFO", **extra}


def _submit(env: dict[str, str], workdir: Path, config: Path) -> str:
    job_env = _job_env(env, CONFIG=str(config), NPROC_PER_NODE="2", MAX_RESTARTS="2")
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--nodes={len(NODES)}", "--cpus-per-task=2", "--gpus-per-node=0", "--time=15",
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


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _node_state(env: dict[str, str], node: str) -> str:
    out = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.stdout.strip()


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    assert (checkpoint / "COMPLETE").is_file(), sorted(p.name for p in checkpoint.parent.iterdir())
    state = torch.load(checkpoint / "model.pt", weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return _weights(run_dir / "checkpoints" / f"step_{STEPS:08d}")


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    final, expected = _final_weights(run_dir), _final_weights(reference)
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(final[name], value), name


def _checkpoints(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "COMPLETE").is_file())


def _epoch(clock: str, near: float) -> float:
    """HH:MM:SS[.ffffff] of a log line as seconds since the epoch (the day of ``near``)."""
    day = time.strftime("%Y-%m-%d", time.localtime(near))
    whole, _, frac = clock.partition(".")
    return time.mktime(time.strptime(f"{day} {whole}", "%Y-%m-%d %H:%M:%S")) + float(f"0.{frac or 0}")


def _slurm_time(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def _train_ranks_by_node() -> dict[str, set[int]]:
    """RANK of every training process (torchrun's children) in each node's network namespace."""
    found: dict[str, set[int]] = {}
    for node, namespace in NAMESPACES.items():
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"dis_dist.train" in cmd and b"torch.distributed.run" not in cmd:
                rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
                if rank is not None:
                    found.setdefault(node, set()).add(rank)
    return found


def test_each_node_is_a_namespace_with_its_own_name_and_address(slurm_env: dict[str, str]) -> None:
    """What the tests below rely on: node<k> answers as node<k> at 10.177.0.<k+1>, resolves every
    node's name to its namespace address, and has no route off the cluster's subnet."""
    _root()
    for k, node in enumerate(NODES, start=1):
        namespace = NAMESPACES[node]
        addresses = subprocess.run(["ip", "-n", namespace, "-o", "-4", "addr"], capture_output=True, text=True).stdout
        assert sorted(re.findall(r"inet (\S+)", addresses)) == sorted(["127.0.0.1/8", f"10.177.0.{k + 1}/24"])
        routes = subprocess.run(["ip", "-n", namespace, "route"], capture_output=True, text=True).stdout.splitlines()
        assert [r.split()[0] for r in routes] == ["10.177.0.0/24"], routes
        slurmd = int((STATE / "run" / f"slurmd-{node}.pid").read_text())
        inside = subprocess.run(
            ["nsenter", "-t", str(slurmd), "-n", "-u", "-m", "sh", "-c", "hostname; getent hosts node1 node2"],
            capture_output=True, text=True, check=True).stdout.split()
        assert inside == [node, "10.177.0.2", "node1", "10.177.0.3", "node2"], inside


@pytest.fixture(scope="module")
def straight(slurm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> dict:
    """An uninterrupted 2-node sbatch run (the reference of the interrupted ones), with the
    ranks of the training processes seen in each node's namespace while it ran."""
    tmp = tmp_path_factory.mktemp("slurm_straight")
    run_dir = tmp / "run"
    job = _submit(slurm_env, tmp, _tiny_config(tmp / "tiny.yaml", run_dir, fmnist_root))
    ranks: dict[str, set[int]] = {}

    def finished() -> bool:
        if os.geteuid() == 0:
            for node, seen in _train_ranks_by_node().items():
                ranks.setdefault(node, set()).update(seen)
        return _job(slurm_env, job).get("JobState") in FINAL

    _wait_for(finished, 300, f"job {job}", interval=0.3)
    info = _job(slurm_env, job)
    assert info["JobState"] == "COMPLETED", (info, (tmp / f"slurm-dis-h2-{job}.out").read_text())
    return {"run_dir": run_dir, "job": job, "ranks": ranks, "info": info}


@pytest.fixture(scope="module")
def references(straight: dict, tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> dict[str, Path]:
    """The same config on this machine: torchrun --standalone with 4 processes (the 2-node job's
    world size), and one process (this one) accumulating the same 4 micro-batches per step."""
    from dis_dist.config import load_config
    from dis_dist.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("slurm_references")
    config = _tiny_config(tmp / "torchrun4.yaml", tmp / "torchrun4", fmnist_root)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "dis_dist.train",
         "--config", str(config)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    config = _tiny_config(tmp / "single.yaml", tmp / "single", fmnist_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes above (OMP_NUM_THREADS=1): 2 threads on a busy machine crawl
    try:
        assert Trainer(load_config(str(config), ["dist.strategy=single"])).fit().step == STEPS
    finally:
        torch.set_num_threads(threads)
    return {"torchrun4": tmp / "torchrun4", "single": tmp / "single"}


def test_sbatch_two_nodes_rendezvous_across_the_namespaces(straight: dict) -> None:
    run_dir, job = straight["run_dir"], straight["job"]
    assert _checkpoints(run_dir)[-1] == STEPS
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "samples.png").is_file()
    if os.geteuid() == 0:  # ranks 0-1 ran in node1's namespace, 2-3 in node2's
        assert straight["ranks"] == {"node1": {0, 1}, "node2": {2, 3}}, straight["ranks"]
    logs = [(run_dir / "logs" / f"{job}-node{n}.log").read_text() for n in (0, 1)]
    rendezvous = []
    for n, log in enumerate(logs):  # srun's node index n: torchrun's group rank n on node<n+1>
        found = re.search(r"I\d{4} (\S+) .*Rendezvous complete for workers", log)
        assert found, log[-3000:]
        result = log[found.end():found.end() + 3000]
        assert re.search(r"\bmaster_addr=node1\b", result) and re.search(rf"\bgroup_rank={n}\b", result), result
        assert f"global_ranks={[2 * n, 2 * n + 1]}" in result and "global_world_sizes=[4, 4]" in result, result
        rendezvous.append(_epoch(found.group(1), time.time()))
    start = _slurm_time(straight["info"]["StartTime"])
    first = re.search(r"^(\d\d:\d\d:\d\d) INFO dis_dist.train: step 1/", logs[0], re.M)
    assert first, logs[0][-3000:]
    print(f"\n2-node sbatch: job start -> c10d rendezvous complete on both nodes {max(rendezvous) - start:.1f} s, "
          f"-> first training step {_epoch(first.group(1), start) - start:.0f} s")


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in a)
    return (num / den) ** 0.5


def test_sbatch_two_nodes_matches_one_machine(straight: dict, references: dict[str, Path]) -> None:
    """Bit-identical to 4 local processes: the trainer's randomness and data depend only on a
    micro-batch's place in the global batch, and the all-reduce of 4 ranks sums in the same
    order wherever they run. One process on the same global batch agrees to rounding: it sums
    the 4 micro-batches' gradients in another order than gloo's all-reduce (so different world
    sizes are never bitwise equal)."""
    _assert_same_weights(straight["run_dir"], references["torchrun4"])
    error = rel_error(_final_weights(straight["run_dir"]), _final_weights(references["single"]))
    print(f"\n2-node sbatch vs one process: relative error {error:.1e}")
    assert error < 1e-5


def test_sbatch_samples_like_one_local_process(straight: dict, slurm_env: dict[str, str], tmp_path: Path) -> None:
    """slurm/sample.sbatch with one process on each node draws exactly the samples of one local process."""
    model = straight["run_dir"]
    args = ["--batch-size", "4", "--steps", "3", "--cfg-scale", "1.5"]
    job_env = _job_env(slurm_env, MODEL=str(model), OUT=str(tmp_path / "cluster"), NUM_SAMPLES="10",
                       ARGS=" ".join(args), NPROC_PER_NODE="1")
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--nodes={len(NODES)}", "--cpus-per-task=2", "--gpus-per-node=0", "--time=10",
         str(ROOT / "slurm" / "sample.sbatch")],
        cwd=tmp_path, env=job_env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    local = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sample.py"), str(model), "--out", str(tmp_path / "local"),
         "--num-samples", "10", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    info = _wait(slurm_env, job, FINAL, 300)
    log = tmp_path / f"slurm-dis-sample-{job}.out"
    assert info["JobState"] == "COMPLETED", (info, log.read_text() if log.is_file() else "")
    assert info["NodeList"] == "node[1-2]", info
    cluster, alone = (np.load(tmp_path / d / "samples.npz") for d in ("cluster", "local"))
    assert cluster["arr_0"].shape == (10, 32, 32, 3)
    assert np.array_equal(cluster["arr_0"], alone["arr_0"]) and np.array_equal(cluster["arr_1"], alone["arr_1"])


@pytest.mark.parametrize("how", ["requeue", "usr1"])
def test_preemption_of_two_nodes_resumes_to_the_same_weights(
    slurm_env: dict[str, str], straight: dict, tmp_path: Path, fmnist_root: Path, how: str
) -> None:
    """``scontrol requeue`` (what preemption does: SIGTERM to every process on both nodes; SLURM
    requeues) and SLURM's warning signal (USR1 to the batch script on node1, which asks training
    to stop and requeues the job itself)."""
    run_dir = tmp_path / "run"
    job = _submit(slurm_env, tmp_path, _tiny_config(tmp_path / "tiny.yaml", run_dir, fmnist_root))
    _wait_for(lambda: 2 * EVERY in _checkpoints(run_dir), 240, "the first checkpoints")
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
    assert 2 * EVERY <= saved_step < STEPS
    saved = (run_dir / "checkpoints" / f"step_{saved_step:08d}" / "COMPLETE").stat().st_mtime
    resumed = _wait_for(lambda: re.search(r"(\d\d:\d\d:\d\d) INFO dis_dist.train: resumed from .*step_(\d+) at",
                                          log.read_text()), 180, "the requeued job to resume")
    info = _wait(slurm_env, job, FINAL, 300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info.get("Restarts", "0")) == 1, info
    assert len(re.findall(r"stopped at step \d+", text)) == 1  # one save for the signal, by rank 0 for all
    assert int(resumed.group(2)) == saved_step  # no step lost: it resumed where it stopped
    restarted = _slurm_time(info["StartTime"])
    print(f"\npreemption ({how}, 2 nodes): signal -> saved {saved - signalled:.1f} s (step {saved_step}), "
          f"saved -> requeued job running {restarted - saved:.0f} s, -> training again "
          f"{_epoch(resumed.group(1), saved) - saved:.0f} s, steps lost 0")
    _assert_same_weights(run_dir, straight["run_dir"])


def test_submitit_two_nodes_trains_like_sbatch(
    slurm_env: dict[str, str], straight: dict, tmp_path: Path, fmnist_root: Path
) -> None:
    """``python -m dis_dist.launch --nodes 2``: one SLURM task per process, 2 per node."""
    require(importlib.util.find_spec("submitit") is not None, "submitit (pip install submitit)")
    run_dir = tmp_path / "run"
    config = _tiny_config(tmp_path / "tiny.yaml", run_dir, fmnist_root)
    proc = subprocess.run(
        [sys.executable, "-m", "dis_dist.launch", "--config", str(config), "--nodes", "2", "--gpus-per-node", "0",
         "--nproc-per-node", "2", "--cpus-per-task", "1", "--timeout-min", "60", "--cluster", "slurm",
         "--folder", str(tmp_path / "submitit"), "--wait"],
        env={**slurm_env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )
    logs = "".join(f.read_text() for f in sorted((tmp_path / "submitit").rglob("*_log.*")))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], logs[-3000:])
    assert proc.stdout.count(f"'step': {STEPS}") == 4, proc.stdout
    placed = {(int(rank), host) for host, rank in
              re.findall(r"Starting with JobEnvironment\(.*?hostname=(\w+),.*?global_rank=(\d+)", logs)}
    assert placed == {(0, "node1"), (1, "node1"), (2, "node2"), (3, "node2")}, placed
    _assert_same_weights(run_dir, straight["run_dir"])


def test_encode_array_over_two_nodes_writes_one_manifest(
    slurm_env: dict[str, str], tmp_path: Path, fmnist_root: Path
) -> None:
    """slurm/encode_latents.sbatch as ``--array=0-1``: each task takes a whole node (2 CPUs), so
    the two land on different nodes; task i encodes shards i, i+2 (SLURM_ARRAY_TASK_ID/COUNT
    give its rank and the world size) and whichever finishes last writes manifest.json."""
    out = tmp_path / "cache"
    job_env = _job_env(slurm_env, INPUT=str(fmnist_root), OUTPUT=str(out), VAE="pixels", RESOLUTION="32",
                       SHARD_SIZE="2500", BATCH_SIZE="500", EXTRA="--split test")
    proc = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=2", "--gpus-per-task=0", "--time=10",
         str(ROOT / "slurm" / "encode_latents.sbatch")],
        cwd=tmp_path, env=job_env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    array = proc.stdout.strip().split(";")[0]
    tasks = {}
    for task in ("0", "1"):
        info = _wait(slurm_env, f"{array}_{task}", FINAL, 240)
        log = tmp_path / f"slurm-encode-latents-{array}_{task}.out"
        assert info["JobState"] == "COMPLETED", (info, log.read_text() if log.is_file() else "")
        assert f"worker {task}/2: 2 of 2 shards to encode" in log.read_text()
        tasks[task] = info["BatchHost"]
    assert sorted(tasks.values()) == list(NODES), tasks
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_samples"] == 10000 and len(manifest["shards"]) == 4
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"], shard["name"]


def test_node_lost_mid_run_resumes_from_a_complete_checkpoint(
    slurm_env: dict[str, str], straight: dict, tmp_path: Path, fmnist_root: Path
) -> None:
    """What happens, as the README documents it: node1's torchrun sees its peers fail, restarts
    its workers and waits in the rendezvous for node2; SLURM marks node2 DOWN after
    SlurmdTimeout, cancels the job and requeues it (JobRequeue=1, --requeue); it stays pending
    until 2 nodes are up again (node2's slurmd restarted: ReturnToService=2), then resumes from
    the newest checkpoint whose COMPLETE marker existed before the loss."""
    _root()
    run_dir = tmp_path / "run"
    job = _submit(slurm_env, tmp_path, _tiny_config(tmp_path / "tiny.yaml", run_dir, fmnist_root))
    _wait_for(lambda: 2 * EVERY in _checkpoints(run_dir), 240, "the first checkpoints")
    killed = time.time()
    try:
        subprocess.run([SCRIPT, "kill-node", "2"], check=True, capture_output=True)
        killed_end = time.time()
        assert not subprocess.run(["ip", "netns", "pids", NAMESPACES["node2"]], capture_output=True,
                                  text=True).stdout.split()
        _wait_for(lambda: _node_state(slurm_env, "node2").startswith("down"), 120, "node2 to be marked DOWN")
        down = time.time()
        _wait(slurm_env, job, {"PENDING"}, 120)  # requeued
        requeued = time.time()
        # When each complete checkpoint was marked complete (before the restart prunes any).
        marked = {step: json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").read_text())["time"]
                  for step in _checkpoints(run_dir)}
        # A save cut off by the loss leaves a .tmp_ directory; one is planted too, past every
        # complete checkpoint, in case the kill fell between saves: it must never be loaded.
        partial = run_dir / "checkpoints" / f".tmp_step_{max(marked) + EVERY:08d}"
        partial.mkdir(exist_ok=True)
        (partial / "model.pt").write_bytes(b"cut off")
        partials = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not (p / "COMPLETE").is_file())
    finally:
        subprocess.run([SCRIPT, "start-node", "2"], check=True, capture_output=True)
    back = time.time()
    info = _wait(slurm_env, job, FINAL, 300)
    log = (run_dir / "logs" / f"{job}-node0.log").read_text()
    assert info["JobState"] == "COMPLETED" and int(info.get("Restarts", "0")) == 1, (info, log[-3000:])
    # Once, by every rank on node1 (ranks 0 and 1 write this log).
    resumed = set(re.findall(r"^(\d\d:\d\d:\d\d) INFO dis_dist.train: resumed from (\S+) at step (\d+)", log, re.M))
    assert len(resumed) == 1, log[-5000:]
    [(clock, path, step)] = resumed
    # The newest complete checkpoint, and its marker was written before the node was lost.
    assert Path(path).name == f"step_{int(step):08d}" and int(step) == max(marked), (path, marked)
    assert marked[int(step)] < killed_end, (marked, killed_end)
    assert not any(name in path for name in partials), (path, partials)
    assert "skipping checkpoint" not in log
    assert not partial.exists()  # the leftover was deleted by the first save after resuming
    restarted = _slurm_time(info["StartTime"])
    print(f"\nnode2 lost (slurmd and its processes SIGKILLed) after the checkpoint of step {step}: "
          f"-> node DOWN {down - killed:.1f} s, -> job requeued {requeued - killed:.1f} s; node2 back at "
          f"{back - killed:.1f} s; -> job running again {restarted - killed:.0f} s, -> resumed from step {step} "
          f"{_epoch(clock, killed) - killed:.0f} s after the loss; partial checkpoints, never loaded: {partials}")
    _assert_same_weights(run_dir, straight["run_dir"])


HANG = """
import sys, time, torch, torch.distributed as dist
from dis_dist.distributed.env import init_distributed
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
