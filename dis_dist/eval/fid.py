"""``tools/fid.py``: the metrics of a set of samples against a reference.

    python tools/fid.py samples/dis_h2/samples.npz VIRTUAL_imagenet256_labeled.npz
    python tools/fid.py runs/demo_samples/samples.npz /usr/share/datasets/fashion-mnist --features fmnist

With the Inception network: FID, sFID, Inception Score, precision and recall (k = 3), computed
as ADM's evaluator computes them. With the Fashion-MNIST classifier: the Frechet distance in its
feature space, the accuracy with which it recognises the class each sample was conditioned on
(labels from ``arr_1``), precision and recall.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dis_dist.errors import DataError
from dis_dist.eval.features import FEATURE_KINDS, Extractor, ReferenceStats, build_extractor, extract, reference_stats
from dis_dist.eval.images import open_images
from dis_dist.eval.metrics import Gaussian, frechet_distance, inception_score, precision_recall
from dis_dist.utils.cli import cli_main, setup_logging

PR_K = 3  # precision/recall's k-th neighbour (ADM's)
# How each metric is printed, in order.
METRIC_NAMES = {
    "fid": "FID", "sfid": "sFID", "is": "Inception Score", "fd": "Frechet distance (classifier features)",
    "accuracy": "conditional accuracy", "precision": "precision", "recall": "recall",
}


def score(
    features: dict[str, np.ndarray], reference: ReferenceStats, extractor: Extractor,
    labels: np.ndarray | None = None, with_precision_recall: bool = True, samples: str = "the samples",
) -> dict[str, float]:
    """The metrics of sample ``features`` (from :func:`extract`) against ``reference``; DataError
    naming ``samples`` or the reference when they cannot be compared."""
    check_comparable(features, reference, extractor, labels, with_precision_recall, samples)
    metrics: dict[str, float] = {}
    distance = "fid" if extractor.kind == "inception" else "fd"
    metrics[distance] = frechet_distance(Gaussian.of(features["pool"]), reference.pool)
    if "spatial" in features and reference.spatial is not None:
        metrics["sfid"] = frechet_distance(Gaussian.of(features["spatial"]), reference.spatial)
    if extractor.kind == "inception":
        metrics["is"] = inception_score(features["logits"])
    elif labels is not None:
        metrics["accuracy"] = float((features["logits"].argmax(1) == np.asarray(labels)).mean())
    if with_precision_recall and reference.pool_features is not None:
        metrics["precision"], metrics["recall"] = precision_recall(reference.pool_features, features["pool"], k=PR_K)
    return metrics


def check_comparable(
    features: dict[str, np.ndarray], reference: ReferenceStats, extractor: Extractor,
    labels: np.ndarray | None, with_precision_recall: bool, samples: str,
) -> None:
    """What :func:`score` needs: statistics of this network's features, labels of its classes,
    enough images for precision/recall."""
    for key, ref in (("pool", reference.pool), ("spatial", reference.spatial)):
        if key in features and ref is not None and ref.mu.shape != features[key].shape[1:]:
            raise DataError(f"{reference.source}: statistics of {ref.mu.shape[0]}-d features, but {extractor.id}'s "
                            f"{key} features are {features[key].shape[1]}-d: statistics of another network? "
                            f"(--features)")
    count = len(features["pool"])
    if labels is not None and extractor.kind != "inception":
        classes = features["logits"].shape[1]
        labels = np.asarray(labels)
        if len(labels) != count:
            raise DataError(f"{samples}: {len(labels)} labels for {count} images")
        outside = labels[(labels < 0) | (labels >= classes)]
        if len(outside):
            raise DataError(f"{samples}: labels (arr_1) outside [0, {classes}) (e.g. {outside[0]}): the "
                            f"{extractor.kind} network knows {classes} classes; labels of another dataset?")
    if with_precision_recall and reference.pool_features is not None:
        ref_count = len(reference.pool_features)
        if min(count, ref_count) <= PR_K:
            raise DataError(f"precision/recall (k = {PR_K}) need more than {PR_K} images in each set: {samples}: "
                            f"{count} images, {reference.source}: {ref_count}; use more, or --no-precision-recall")


def check_reference(reference: ReferenceStats, extractor: Extractor, num_samples: int,
                    image_shape: tuple[int, int, int], with_precision_recall: bool) -> None:
    """Before any sample is drawn: ``num_samples`` images of ``image_shape`` (H, W, C) can be
    scored against ``reference`` with ``extractor`` (the checks :func:`score` makes, on features
    of their shape)."""
    probe = extractor(np.zeros((2, *image_shape), dtype=np.uint8))
    features = {k: np.zeros((num_samples, *v.shape[1:]), dtype=np.float32) for k, v in probe.items()}
    check_comparable(features, reference, extractor, None, with_precision_recall, f"{num_samples} samples")
    if num_samples < 2:
        raise DataError(f"{num_samples} samples cannot be scored: the metrics need at least 2")


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{METRIC_NAMES[k]} {v:.4f}" for k, v in metrics.items())


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/fid.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="samples: an .npz (arr_0 images, arr_1 labels), an image folder or shards")
    p.add_argument("reference", help="reference: an ADM reference batch .npz, a statistics .npz (mu, sigma; "
                   "no precision/recall), an image folder or shards, or Fashion-MNIST's IDX directory")
    p.add_argument("--features", choices=FEATURE_KINDS, default="inception",
                   help="feature network (default: inception)")
    p.add_argument("--inception-weights", "--weights", dest="weights", default=None,
                   help="the network's weights file (inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, "
                   "default: the torch hub cache; fmnist: default .cache/fmnist_classifier.pt)")
    p.add_argument("--resolution", type=int, default=None,
                   help="center-crop folder/shard images to this size (default: the samples' size)")
    p.add_argument("--limit", type=int, default=None, help="use the first N images of each set")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default: $DIS_DIST_CACHE/eval "
                   "or ~/.cache/dis_dist/eval)")
    p.add_argument("--save-ref-stats", default=None, help="also write the reference statistics to this .npz")
    p.add_argument("--no-precision-recall", action="store_true", help="skip precision/recall (k-NN over all pairs)")
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    args = p.parse_args(argv)
    setup_logging()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    extractor = build_extractor(args.features, args.weights, device)
    samples = open_images(args.samples, resolution=args.resolution, limit=args.limit)
    first = next(samples.batches(1), None)
    if first is None:
        raise DataError(f"no images in {samples.description}")
    print(f"samples: {samples.description}")
    reference = reference_stats(
        args.reference, extractor, resolution=args.resolution or first.shape[1], limit=args.limit,
        cache_dir=args.cache_dir, batch_size=args.batch_size,
    )
    if args.save_ref_stats:
        reference.save(Path(args.save_ref_stats))
    features = extract(extractor, samples, args.batch_size)
    metrics = score(features, reference, extractor, samples.labels, not args.no_precision_recall, args.samples)
    print(f"{len(features['pool'])} samples against {reference.count} reference images ({extractor.id}):")
    width = max(len(METRIC_NAMES[k]) for k in metrics)
    for key, value in metrics.items():
        print(f"  {METRIC_NAMES[key]:<{width}}  {value:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": args.samples, "reference": args.reference,
                                               "features": extractor.id, **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
