"""Evaluation during training: every ``eval.every`` steps, ``eval.num_samples`` EMA samples,
drawn by all ranks together (each its share of the batches of ``sample.batch_size``), scored on
rank 0 against the reference statistics (computed once, cached)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from dis_dist.config import RunConfig
from dis_dist.data.encoders import latent_decoder
from dis_dist.diffusion import GaussianDiffusion
from dis_dist.distributed.env import DistEnv
from dis_dist.errors import ConfigError
from dis_dist.eval.features import build_extractor, reference_stats
from dis_dist.eval.fid import check_reference, score
from dis_dist.models.spec import ModelSpec
from dis_dist.sampling import Sampler, SampleSettings

VAE_DOWNSAMPLING = 8  # image pixels per latent pixel (the SD VAE), for references stored as images


class Evaluator:
    """Built by every rank at the start of training (the feature network and the decoder
    everywhere, the reference statistics on rank 0); called collectively."""

    def __init__(self, cfg: RunConfig, env: DistEnv, spec: ModelSpec, vae: str, scaling_factor: float,
                 batch_size: int) -> None:
        self.cfg, self.env, self.batch_size = cfg, env, batch_size
        ec = cfg.eval
        if "://" not in ec.reference and not Path(ec.reference).exists():  # on every rank: none waits for rank 0
            raise ConfigError(f"eval.reference: {ec.reference!r} does not exist")
        self.decode = latent_decoder(vae, scaling_factor, env.device)
        self.extractor = build_extractor(ec.features, ec.weights or None, env.device)
        resolution = spec.input_size * (1 if vae == "pixels" else VAE_DOWNSAMPLING)
        # Rank 0 scores; it reads (or computes, checks and caches) the reference now and checks
        # that eval.num_samples samples can be scored against it, so that what evaluation will
        # need fails before training starts.
        self.reference = None
        if env.is_main:
            self.reference = reference_stats(ec.reference, self.extractor, resolution=resolution,
                                             batch_size=ec.batch_size)
            channels = spec.in_channels if vae == "pixels" else 3
            check_reference(self.reference, self.extractor, ec.num_samples, (resolution, resolution, channels),
                            ec.precision_recall)
        self.settings = SampleSettings.of(cfg.sample)
        # Samples 0..keep-1 of the last call that asked for them, once every rank has drawn its
        # share: [(indices, images, labels)] on rank 0, [] elsewhere; None when not kept.
        self.kept: list[tuple[list[int], np.ndarray, np.ndarray | None]] | None = None

    def __call__(
        self, model: nn.Module, diffusion: GaussianDiffusion, collective: bool = False, keep: int = 0
    ) -> dict[str, float] | None:
        """Collective. Draw the samples and score them: return the metrics on rank 0, None
        elsewhere. ``collective``: every rank must call ``model`` equally often (a sharded model).
        ``keep``: also keep the images of samples 0..keep-1 in :attr:`kept` (the trainer's grid at
        this step is those samples: the grid and the evaluation draw with the same settings)."""
        ec, env = self.cfg.eval, self.env
        self.kept = None
        sampler = Sampler(diffusion, self.settings, self.decode, env.device, bf16=self.cfg.train.precision == "bf16")
        features: dict[str, list[np.ndarray]] = {}
        labels: list[np.ndarray] = []
        kept: list[tuple[list[int], np.ndarray, np.ndarray | None]] = []
        for indices, images, y in sampler.share(model, ec.num_samples, self.batch_size, rank=env.rank,
                                                world_size=env.world_size, collective=collective):
            for key, value in self.extractor(images).items():
                features.setdefault(key, []).append(value)
            if y is not None:
                labels.append(y)
            first = [k for k, i in enumerate(indices) if i < keep]
            if first:
                kept.append(([indices[k] for k in first], images[first], None if y is None else y[first]))
        mine = ({k: np.concatenate(v) for k, v in features.items()}, np.concatenate(labels) if labels else None,
                kept)
        everyone = env.gather_to_main(mine)
        if keep:
            self.kept = [] if everyone is None else [b for p in everyone for b in p[2]]
        if everyone is None:
            return None
        parts = [p for p in everyone if len(p[0])]  # a rank with no batch sends nothing
        merged = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
        y_all = np.concatenate([p[1] for p in parts]) if parts[0][1] is not None else None
        return score(merged, self.reference, self.extractor, y_all, ec.precision_recall)

