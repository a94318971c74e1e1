"""A small Fashion-MNIST classifier: the feature space of the demo's Frechet distance (where
Inception weights are not at hand) and the judge of conditional accuracy, i.e. whether a sample
shows the class it was conditioned on. Trained once by ``tools/train_fmnist_classifier.py``
and cached."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dis_dist.data.fmnist import CLASS_NAMES, DEFAULT_ROOT, load_fmnist
from dis_dist.errors import ConfigError
from dis_dist.utils.cli import cli_main, setup_logging
from dis_dist.utils.safe_load import load_torch

log = logging.getLogger(__name__)
DEFAULT_PATH = ".cache/fmnist_classifier.pt"
IMAGE_SIZE = 32  # the demo's resolution: 28x28 digits zero-padded, as the trainer sees them
FEATURES = 256


class FmnistClassifier(nn.Module):
    """Three conv-pool stages and a 256-wide hidden layer (the features) before 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((1, 16), (16, 32), (32, 64)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, len(CLASS_NAMES))

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """uint8 (n, H, W, C) (C = 1 or 3, H = W = 28 or 32) -> float (n, 1, 32, 32) in [-1, 1]."""
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        pad = IMAGE_SIZE - x.shape[-1]
        if pad < 0 or x.shape[-1] != x.shape[-2]:
            raise ConfigError(f"the Fashion-MNIST classifier takes square images up to 32 px, got "
                              f"{tuple(images.shape)}")
        if pad:
            x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return x / 127.5 - 1

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 images -> ``pool`` (the 256 features) and ``logits`` (10 classes)."""
        pool = self.body(self.preprocess(images.to(self.head.weight.device)))
        return {"pool": pool, "logits": self.head(pool)}


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> FmnistClassifier:
    if not Path(path).is_file():
        raise ConfigError(
            f"no Fashion-MNIST classifier at {str(path)!r}; train it once with: "
            f"python tools/train_fmnist_classifier.py --out {path}"
        )
    model = FmnistClassifier()
    model.load_state_dict(load_torch(path, map_location="cpu")["model"])
    return model.to(device).eval().requires_grad_(False)


def _nhwc(images: Tensor) -> Tensor:  # the dataset's uint8 (n, 1, H, W) -> (n, H, W, 1)
    return images.permute(0, 2, 3, 1)


@torch.no_grad()
def accuracy(model: FmnistClassifier, images: Tensor, labels: Tensor, batch: int = 1000) -> float:
    correct = sum(
        int((model(_nhwc(x))["logits"].argmax(1).cpu() == y).sum())
        for x, y in zip(images.split(batch), labels.split(batch))
    )
    return correct / len(labels)


def train_classifier(
    out: str | Path, root: str | Path = DEFAULT_ROOT, epochs: int = 2, limit: int | None = None,
    batch_size: int = 128, seed: int = 0,
) -> float:
    """Train on the train split (its first ``limit`` images), save to ``out``; returns the test
    accuracy, which is saved with the weights."""
    torch.manual_seed(seed)
    train, test = load_fmnist(root, "train", IMAGE_SIZE), load_fmnist(root, "test", IMAGE_SIZE)
    images, labels = train.images[:limit], train.labels[:limit]
    model = FmnistClassifier()
    steps = epochs * (len(labels) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="classifier", unit="step", disable=None)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for i in range(len(labels) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = _nhwc(images[idx])
            if torch.rand((), generator=gen) < 0.5:  # a mirrored garment is the same garment
                x = x.flip(2)
            loss = F.cross_entropy(model(x)["logits"], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    acc = accuracy(model, test.images, test.labels)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out) + ".tmp")
    torch.save({"model": model.state_dict(), "test_accuracy": acc, "train_images": len(labels),
                "epochs": epochs}, tmp)
    tmp.replace(out)
    log.info("trained the Fashion-MNIST classifier in %.0f s: test accuracy %.4f", time.perf_counter() - start, acc)
    return acc


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/train_fmnist_classifier.py",
        description="Train (once) the Fashion-MNIST classifier whose features and predictions judge "
        "the demo's samples: Frechet distance in its feature space and conditional accuracy.",
    )
    p.add_argument("--out", default=DEFAULT_PATH, help=f"weights file (default: {DEFAULT_PATH})")
    p.add_argument("--root", default=DEFAULT_ROOT, help="Fashion-MNIST IDX directory")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--force", action="store_true", help="retrain even if --out exists")
    args = p.parse_args(argv)
    setup_logging()
    if Path(args.out).is_file() and not args.force:
        saved = load_torch(args.out, map_location="cpu")
        print(f"classifier already trained: {args.out} (test accuracy {saved['test_accuracy']:.4f}); --force retrains")
        return 0
    acc = train_classifier(args.out, args.root, args.epochs, args.limit)
    print(f"classifier saved to {args.out}: test accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
