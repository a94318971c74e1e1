"""Sample-quality statistics on feature vectors: Frechet distance, Inception Score and improved
precision/recall (Kynkaanniemi et al. 2019), computed as ADM's evaluator does, in float64 where
it matters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Gaussian:
    """Mean and covariance of a set of feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray | Tensor) -> Gaussian:
        x = torch.as_tensor(features, dtype=torch.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need (n >= 2, dim) features for a covariance, got {tuple(x.shape)}")
        mu = x.mean(0)
        centred = x - mu
        sigma = centred.T @ centred / (x.shape[0] - 1)
        return cls(mu.numpy(), sigma.numpy())


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative
    eigenvalues from rounding are clipped to zero)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b, which are
    those of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2): two symmetric eigendecompositions
    in float64, no general (non-symmetric) matrix square root, so rank-deficient covariances
    (fewer samples than dimensions) give a finite, accurate answer without the usual epsilon.
    """
    mu_a, mu_b = (torch.as_tensor(g.mu, dtype=torch.float64) for g in (a, b))
    s_a, s_b = (torch.as_tensor(g.sigma, dtype=torch.float64) for g in (a, b))
    d = mu_a.shape[0] if mu_a.ndim == 1 else -1
    if mu_a.shape != mu_b.shape or s_a.shape != (d, d) or s_b.shape != (d, d):
        raise ValueError(f"the Gaussians do not match: mu {tuple(mu_a.shape)} and {tuple(mu_b.shape)}, sigma "
                         f"{tuple(s_a.shape)} and {tuple(s_b.shape)} (expected (d,) and (d, d))")
    root_a = _psd_sqrt(s_a)
    middle = root_a @ s_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross
    return float(value.clamp(min=0))


def inception_score(logits: np.ndarray | Tensor, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over splits of ``split_size`` samples (ADM: 5,000,
    ten splits for 50k samples). ``logits`` are the classifier's pre-softmax outputs."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = []
    for part in probs.split(split_size):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(1)
        scores.append(float(torch.exp(kl.mean())))
    return float(np.mean(scores))


def _kth_neighbour_radii(x: Tensor, k: int, batch: int) -> Tensor:
    """Distance of each row of x to its k-th nearest other row. ``topk`` of the k + 1 smallest
    picks the value ``kthvalue`` would, several times faster on CPU (a 10,000-image reference:
    seconds of each evaluation)."""
    radii = []
    for rows in x.split(batch):
        d = torch.cdist(rows, x)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # the nearest is the row itself, at 0
    return torch.cat(radii)


def _fraction_inside(points: Tensor, centres: Tensor, radii: Tensor, batch: int) -> float:
    """Fraction of ``points`` within radius of at least one centre (ties count as inside)."""
    inside = 0
    for rows in points.split(batch):
        d = torch.cdist(rows, centres)
        inside += int((d <= radii[None]).any(dim=1).sum())
    return inside / points.shape[0]


def precision_recall(
    real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int = 3, batch: int = 2000
) -> tuple[float, float]:
    """Improved precision (fakes inside the real manifold) and recall (reals inside the fake
    manifold), each manifold the union of balls reaching every point's k-th nearest neighbour."""
    real_t, fake_t = (torch.as_tensor(x, dtype=torch.float32) for x in (real, fake))
    if min(real_t.shape[0], fake_t.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    real_r = _kth_neighbour_radii(real_t, k, batch)
    fake_r = _kth_neighbour_radii(fake_t, k, batch)
    return _fraction_inside(fake_t, real_t, real_r, batch), _fraction_inside(real_t, fake_t, fake_r, batch)
