"""Submit training with submitit: ``python -m dis_dist.launch --config X.yaml [key=value ...]``.

One SLURM task per process (GPU), ranks from submitit's job environment. When SLURM preempts the
job or its time runs out, submitit's signal (USR2, after SIGTERM on preemption) asks training to
save at the next step; then ``TrainJob.checkpoint`` resubmits the same job, which resumes from
that checkpoint. Job ids and logs go to ``<run_dir>/submitit/``.

    python -m dis_dist.launch --config configs/dis_h2_in256.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --timeout-min 1440
    python -m dis_dist.launch --config configs/demo_fmnist.yaml --cluster local   # this machine
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from dis_dist.config import load_config
from dis_dist.errors import ConfigError
from dis_dist.utils.cli import cli_main


def _submitit():  # noqa: ANN202
    try:
        import submitit
    except ImportError:
        raise ConfigError("python -m dis_dist.launch needs submitit: pip install submitit") from None
    return submitit


class TrainJob:
    """What each task runs: the trainer, in the rank submitit's environment gives this task.

    Checkpointable (submitit calls ``checkpoint`` on preemption or timeout): by then training has
    saved, so resubmitting the same job resumes it.
    """

    def __init__(self, config: str | None, overrides: list[str]) -> None:
        self.config, self.overrides = config, overrides

    def __call__(self) -> dict[str, Any]:
        import torch.distributed as dist

        from dis_dist.train.trainer import Trainer

        job = _submitit().JobEnvironment()
        os.environ.update({
            "RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_RANK": str(job.local_rank), "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
            "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(29500 + int(str(job.job_id).split("_")[0]) % 1000),
        })
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() and requeue
        cfg = load_config(self.config, self.overrides)
        trainer = Trainer(cfg)
        result = trainer.fit(resume="auto")  # USR1/USR2/SIGTERM: save at the next step, return
        # A barrier last: gloo's worker thread frees each finished collective, and freeing one that
        # holds tensors needs the GIL, while tearing the group down joins that thread holding the
        # GIL; a deadlock seen after the end-of-run grid's all-gather (a barrier holds no tensors).
        dist.barrier()
        del trainer
        dist.destroy_process_group()
        if result.stopped and callable(requeue):
            requeue(signal.SIGUSR2, None)  # rank 0 resubmits (and exits); the others return
        return {"step": result.step, "final_loss": result.final_loss, "stopped": result.stopped}

    def checkpoint(self) -> Any:
        """The resubmission of this job (training saved before submitit gets here)."""
        return _submitit().helpers.DelayedSubmission(TrainJob(self.config, self.overrides))


def submit(
    config: str | None, overrides: list[str], *, nodes: int = 1, gpus_per_node: int = 8,
    nproc_per_node: int | None = None, cpus_per_task: int = 8, partition: str | None = None,
    account: str | None = None, timeout_min: int = 24 * 60, cluster: str | None = None,
    folder: str | Path | None = None, max_requeues: int = 100,
) -> Any:
    """Submit a training run; returns the submitit job."""
    submitit = _submitit()
    cfg = load_config(config, overrides)  # fail here, not on the cluster
    folder = Path(folder or Path(cfg.run_dir) / "submitit")
    tasks = nproc_per_node or max(1, gpus_per_node)
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster, slurm_max_num_timeout=max_requeues)
    params: dict[str, Any] = {"nodes": nodes, "tasks_per_node": tasks, "cpus_per_task": cpus_per_task,
                              "timeout_min": timeout_min, "name": f"dis-{Path(cfg.run_dir).name}"}
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if executor.cluster == "slurm":
        params["slurm_signal_delay_s"] = 180
        if partition:
            params["slurm_partition"] = partition
        if account:
            params["slurm_account"] = account
    executor.update_parameters(**params)
    job = executor.submit(TrainJob(config, overrides))
    with open(folder / "jobs.txt", "a") as f:
        f.write(f"{job.job_id}\n")
    return job


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dis_dist.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (0: CPU nodes)")
    p.add_argument("--nproc-per-node", type=int, help="processes per node (default: the GPUs, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--timeout-min", type=int, default=24 * 60)
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), help="default: SLURM when available")
    p.add_argument("--folder", help="submitit's folder (default: <run_dir>/submitit)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=1000")
    args = p.parse_args(argv)
    job = submit(args.config, args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                 nproc_per_node=args.nproc_per_node, cpus_per_task=args.cpus_per_task,
                 partition=args.partition, account=args.account, timeout_min=args.timeout_min,
                 cluster=args.cluster, folder=args.folder)
    print(f"submitted job {job.job_id}; logs: {job.paths.stdout} (and per task beside it)")
    if args.wait:
        print(job.results())
    return 0


if __name__ == "__main__":
    sys.exit(main())
