"""What a run reports: TensorBoard scalars/images/text from rank 0 and a console progress line."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("dis_dist.train")


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def free_memory_bytes(device: torch.device, local_ranks: int = 1) -> float:
    """Memory this rank may still use: the GPU's free memory, or on CPU the host's available
    memory shared among the ``local_ranks`` processes of this machine."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024 / max(1, local_ranks)


# Dense peak FLOP/s per GPU (bf16, and TF32 for fp32 training), from the vendors' datasheets.
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A10G": (70e12, 35e12),
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s for MFU; None on CPUs and GPUs not in PEAK_FLOPS."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_FLOPS.items():
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunLogger:
    """TensorBoard events in the run directory (rank 0 only) and progress lines on the console."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, first_step: int = 1) -> None:
        """``first_step``: the first step this run logs; TensorBoard hides what earlier runs in
        the directory logged from it on (a run resumed from a checkpoint logs those steps again)."""
        self.enabled, self.total_steps = enabled, total_steps
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=first_step)
        self._t0 = time.perf_counter()
        self._first_step: int | None = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """uint8 (H, W, C) image."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def progress(self, step: int, loss: float, images_per_sec: float) -> None:
        """One console line: step, loss, throughput and the ETA from the average step time so far."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._first_step is None:
            self._first_step, self._t0 = step, now
            eta = "?"
        else:
            per_step = (now - self._t0) / max(1, step - self._first_step)
            eta = format_duration(per_step * (self.total_steps - step))
        log.info(
            "step %d/%d | loss %.4f | %.1f img/s | ETA %s",
            step, self.total_steps, loss, images_per_sec, eta,
        )

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
