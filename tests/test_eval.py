"""Evaluation: the metrics' math, the Inception network's loading and preprocessing, the
Fashion-MNIST classifier, sampling by index (the same images on any number of ranks), and
evaluation during training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dis_dist.errors import ConfigError, DataError
from dis_dist.eval import inception
from dis_dist.eval.classifier import FmnistClassifier
from dis_dist.eval.features import ReferenceStats, build_extractor, extract, reference_stats
from dis_dist.eval.images import open_images
from dis_dist.eval.metrics import Gaussian, frechet_distance, inception_score, precision_recall
from dis_dist.sampling import Sampler, SampleSettings, batches_of_rank, sample_labels
from dis_dist.utils.npz import iter_npz, write_npz

ROOT = Path(__file__).resolve().parents[1]


# -- Frechet distance ---------------------------------------------------------------------------

def _eigvals_fd(a: Gaussian, b: Gaussian) -> float:
    """An independent route: Tr sqrt(S_a S_b) from the (non-symmetric) product's eigenvalues."""
    product_eigs = np.linalg.eigvals(a.sigma @ b.sigma)
    cross = np.sqrt(np.clip(product_eigs.real, 0, None)).sum()
    return float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * cross)


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 64)) * 3 + 1
    g = Gaussian.of(feats)
    assert abs(frechet_distance(g, g)) < 1e-8 * np.trace(g.sigma)


def test_frechet_distance_matches_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    # Diagonal covariances: ||mu_a - mu_b||^2 + sum (s_a + s_b - 2 sqrt(s_a s_b)).
    mu_a, mu_b = rng.normal(size=8), rng.normal(size=8)
    s_a, s_b = rng.uniform(0.1, 4, size=8), rng.uniform(0.1, 4, size=8)
    expected = ((mu_a - mu_b) ** 2).sum() + (s_a + s_b - 2 * np.sqrt(s_a * s_b)).sum()
    got = frechet_distance(Gaussian(mu_a, np.diag(s_a)), Gaussian(mu_b, np.diag(s_b)))
    assert got == pytest.approx(expected, rel=1e-10)
    # Full covariances (that do not commute), against the eigenvalues of their product.
    m_a, m_b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    a, b = Gaussian(mu_a, m_a @ m_a.T + 0.1 * np.eye(8)), Gaussian(mu_b, m_b @ m_b.T)
    assert frechet_distance(a, b) == pytest.approx(_eigvals_fd(a, b), rel=1e-8)
    # Two samples of one Gaussian are close; of two Gaussians, the closed form.
    x = rng.normal(size=(20000, 4))
    far = Gaussian.of(x[10000:] * 2 + 3)  # mean 3, variance 4 per dim
    assert frechet_distance(Gaussian.of(x[:10000]), far) == pytest.approx(4 * (9 + 1 + 4 - 4), rel=0.05)


def test_frechet_distance_is_stable_for_rank_deficient_covariances() -> None:
    rng = np.random.default_rng(2)
    few = rng.normal(size=(10, 256))  # 10 samples in 256 dimensions: rank 9
    other = rng.normal(size=(12, 256)) + 0.5
    a, b = Gaussian.of(few), Gaussian.of(other)
    assert np.linalg.matrix_rank(a.sigma) == 9
    assert abs(frechet_distance(a, a)) < 1e-8 * np.trace(a.sigma)
    d = frechet_distance(a, b)
    assert np.isfinite(d) and d > 0
    assert d == pytest.approx(_eigvals_fd(a, b), rel=1e-6)
    # A covariance of exactly zero (a single repeated point) is fine too.
    point = Gaussian(np.ones(256), np.zeros((256, 256)))
    assert frechet_distance(point, b) == pytest.approx(((1 - b.mu) ** 2).sum() + np.trace(b.sigma), rel=1e-10)


def test_inception_score_bounds() -> None:
    assert inception_score(np.zeros((100, 10))) == pytest.approx(1.0)  # every prediction the same
    confident = np.full((1000, 10), -50.0)
    confident[np.arange(1000), np.arange(1000) % 10] = 50.0
    assert inception_score(confident, split_size=500) == pytest.approx(10.0, rel=1e-6)  # sharp and diverse


def test_precision_recall() -> None:
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 16))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Fakes collapsed onto one part (16%) of a real 2-D Gaussian: precise, poor recall.
    plane = rng.normal(size=(1000, 2))
    precision, recall = precision_recall(plane, plane[plane[:, 0] > 1.0] + 1e-3)
    assert precision == 1.0 and recall < 0.3


def test_kth_neighbour_radii_are_the_sorted_distances() -> None:
    """Each row's distance to its k-th nearest other row, ties included (points on a grid),
    across batch boundaries."""
    from dis_dist.eval.metrics import _kth_neighbour_radii

    rng = np.random.default_rng(0)
    for points in (rng.integers(0, 3, size=(50, 2)).astype(np.float32), rng.normal(size=(60, 8)).astype(np.float32)):
        x = torch.from_numpy(points)
        expected = torch.cdist(x, x).sort(dim=1).values[:, 3]
        assert torch.equal(_kth_neighbour_radii(x, 3, batch=16), expected)


# -- Inception ----------------------------------------------------------------------------------

def test_inception_features_have_the_standard_shapes() -> None:
    net = inception.load_inception(None)
    for images in (np.zeros((2, 32, 32, 3), np.uint8), np.full((1, 64, 48, 1), 200, np.uint8)):
        out = net(torch.from_numpy(images))
        assert out["pool"].shape == (len(images), 2048)
        assert out["spatial"].shape == (len(images), 17 * 17 * 7)
        assert out["logits"].shape == (len(images), 1008)


def test_inception_weights_load_in_pytorch_fid_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    source = inception.load_inception(None)
    with torch.no_grad():  # non-default BN statistics, so a load that skipped them would show
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    # pytorch-fid's file: torchvision's names, no num_batches_tracked.
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    weights = tmp_path / inception.WEIGHTS_NAME
    torch.save(state, weights)
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    loaded = inception.load_inception(weights)
    for key, value in source(images).items():
        torch.testing.assert_close(loaded(images)[key], value, rtol=0, atol=0)
    # Found through the environment variable and the torch hub cache too.
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(weights))
    assert inception.find_weights() == weights
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as e:
        inception.find_weights()
    hub_file = tmp_path / "hub" / "checkpoints" / inception.WEIGHTS_NAME
    assert inception.WEIGHTS_URL in str(e.value) and str(hub_file) in str(e.value)
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(weights.read_bytes())
    assert inception.find_weights() == hub_file
    # Another network's file is refused by name.
    del state["fc.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="fc.weight"):
        inception.load_inception(tmp_path / "bad.pth")


def test_inception_preprocessing_is_tf_fids() -> None:
    """uint8 -> [0, 1] -> bilinear resize to 299 with half-pixel centres (align_corners=False,
    no antialiasing) -> [-1, 1]; grayscale repeated to RGB."""
    x = inception.preprocess(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2, 1).expand(1, 2, 2, 1))
    assert x.shape == (1, 3, 299, 299)
    assert x.min() == -1 and x.max() == 1
    # A horizontal ramp of width 4: output column j samples source x = (j + 0.5) * 4 / 299 - 0.5,
    # clamped at the borders, linearly interpolated.
    ramp = torch.tensor([0, 60, 120, 240], dtype=torch.uint8).view(1, 1, 4, 1).expand(1, 4, 4, 3)
    out = inception.preprocess(ramp)[0, 0, 100].double()
    src = np.clip((np.arange(299) + 0.5) * 4 / 299 - 0.5, 0, 3)
    expected = np.interp(src, np.arange(4), [0, 60, 120, 240]) / 255 * 2 - 1
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    # At 299 px nothing is resampled: only the scaling.
    img = torch.randint(0, 256, (1, 299, 299, 3), dtype=torch.uint8)
    torch.testing.assert_close(inception.preprocess(img), img.permute(0, 3, 1, 2).float() / 127.5 - 1)


# -- files and image sets -----------------------------------------------------------------------

def test_npz_written_in_pieces_reads_back(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10)
    write_npz(tmp_path / "s.npz", {"arr_0": (images.shape, np.uint8, [images[:3], images[3:]]),
                                   "arr_1": (labels.shape, np.int64, [labels])})
    z = np.load(tmp_path / "s.npz")
    assert np.array_equal(z["arr_0"], images) and np.array_equal(z["arr_1"], labels)
    assert np.array_equal(np.concatenate(list(iter_npz(tmp_path / "s.npz", "arr_0", 4))), images)
    with pytest.raises(ValueError, match="declared"):
        write_npz(tmp_path / "bad.npz", {"arr_0": ((11, 4, 4, 3), np.uint8, [images])})
    assert not (tmp_path / "bad.npz").exists()


def test_image_folder_is_read_lazily_and_center_cropped(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    images = open_images(str(tmp_path), resolution=32)
    assert images.count == 6
    batches = list(images.batches(4))
    assert [b.shape for b in batches] == [(4, 32, 32, 3), (2, 32, 32, 3)] and batches[0].dtype == np.uint8
    assert len(list(open_images(str(tmp_path), resolution=32, limit=5).batches(4))[-1]) == 1
    with pytest.raises(DataError, match="resolution"):
        open_images(str(tmp_path))


# -- the Fashion-MNIST classifier ---------------------------------------------------------------

def test_classifier_recognises_the_test_split(classifier: Path, fmnist_root: Path, tmp_path: Path) -> None:
    ex = build_extractor("fmnist", str(classifier))
    test = open_images(str(fmnist_root), limit=2000)
    feats = extract(ex, test, progress=False)
    assert feats["pool"].shape == (2000, 256)
    assert (feats["logits"].argmax(1) == test.labels).mean() > 0.75
    # 28x28 and RGB inputs are the same garment to it as the padded 32x32 grayscale.
    img = next(test.batches(8))
    rgb28 = np.repeat(img[:, 2:30, 2:30], 3, axis=-1)
    torch.testing.assert_close(FmnistClassifier.preprocess(torch.from_numpy(rgb28)),
                               FmnistClassifier.preprocess(torch.from_numpy(img)))
    # Reference statistics are computed once, then read from the cache.
    stats = reference_stats(str(fmnist_root), ex, cache_dir=tmp_path, limit=500, progress=False)
    cached = list(tmp_path.glob("ref-fmnist-*.npz"))
    assert len(cached) == 1 and stats.count == 500
    again = ReferenceStats.load(cached[0])
    np.testing.assert_allclose(again.pool.sigma, stats.pool.sigma)
    # Half the test split against the other half: close; against a shifted copy: far.
    halves = [Gaussian.of(feats["pool"][:1000]), Gaussian.of(feats["pool"][1000:])]
    assert frechet_distance(*halves) < 0.2 * frechet_distance(halves[0], Gaussian.of(feats["pool"][1000:] + 1))


# -- sampling by index --------------------------------------------------------------------------

def test_batches_do_not_depend_on_the_world_size() -> None:
    for world in (1, 2, 3, 8):
        batches = [b for r in range(world) for b in batches_of_rank(10, 4, r, world)]
        assert sorted(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sample_labels("balanced", [0, 1, 12], 10, 0).tolist() == [0, 1, 2]
    assert sample_labels("3,5", [0, 1, 2], 10, 0).tolist() == [3, 5, 3]
    uniform = sample_labels("uniform", list(range(200)), 10, 0)
    assert uniform.tolist() == sample_labels("uniform", list(range(200)), 10, 0).tolist()
    assert sample_labels("uniform", [7], 10, 0).tolist() == [uniform[7]]  # per sample, not per batch
    assert len(set(uniform.tolist())) == 10
    with pytest.raises(ConfigError):
        sample_labels("12", [0], 10, 0)


def _tiny_model() -> tuple[torch.nn.Module, object]:
    from dis_dist.diffusion import create_diffusion
    from dis_dist.models import build_model

    torch.manual_seed(0)
    model = build_model("DiS-T/8", input_size=16, in_channels=1, num_classes=10).eval()
    return model, create_diffusion("4")


def test_a_sample_depends_only_on_its_seed_and_index() -> None:
    model, diffusion = _tiny_model()
    kw = dict(settings=SampleSettings(seed=5, cfg_scale=2.0), decode=lambda z: z, device=torch.device("cpu"))

    def generate(model, diffusion, indices, **kw):
        return Sampler(diffusion, **kw).generate(model, indices)  # shape and classes: the model's

    images, labels = generate(model, diffusion, [0, 1, 2, 3], **kw)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and labels.shape == (4,)
    again, _ = generate(model, diffusion, [0, 1, 2, 3], **kw)
    assert np.array_equal(images, again)  # same seed, same images
    alone, alone_labels = generate(model, diffusion, [2], **kw)  # another batch: same sample
    assert np.abs(alone[0].astype(int) - images[2].astype(int)).max() <= 1 and alone_labels[0] == labels[2]
    other, _ = generate(model, diffusion, [0, 1, 2, 3], **{**kw, "settings": SampleSettings(seed=6, cfg_scale=2.0)})
    assert not np.array_equal(images, other)


def _export_tiny(directory: Path) -> Path:
    from safetensors.torch import save_file

    model, _ = _tiny_model()
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    info = {"name": "DiS-T/8", "input_size": 16, "in_channels": 1, "num_classes": 10, "learn_sigma": True,
            "vae": "pixels", "scaling_factor": 1.0, "class_names": [str(i) for i in range(10)]}
    (directory / "config.json").write_text(json.dumps(info))
    return directory


def _sample_cli(model: Path, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(ROOT / "tools" / "sample.py"), str(model), "--out", str(out), "--num-samples", "10",
           "--batch-size", "4", "--steps", "3", "--cfg-scale", "1.5", "--seed", "3", "--grid", "9", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_ranks_sample_exactly_the_images_of_one(tmp_path: Path) -> None:
    model = _export_tiny(tmp_path / "export")
    one = _sample_cli(model, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _sample_cli(model, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (10, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert a["arr_0"].std() > 0 and (tmp_path / "two" / "grid.png").is_file()
    # Resumable: a lost part is drawn again, the rest is kept, the result is the same.
    parts = sorted((tmp_path / "two" / "parts").glob("*.npz"))
    assert len(parts) == 3
    parts[1].unlink()
    kept = parts[0].stat().st_mtime_ns
    again = _sample_cli(model, tmp_path / "two", 1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert parts[0].stat().st_mtime_ns == kept and parts[1].is_file()
    assert np.array_equal(np.load(tmp_path / "two" / "samples.npz")["arr_0"], a["arr_0"])
    # Other settings in the same directory are refused.
    clash = _sample_cli(model, tmp_path / "two", 1, "--labels", "balanced")
    assert clash.returncode == 2 and "other settings" in clash.stderr


# -- scoring samples ----------------------------------------------------------------------------

@pytest.mark.slow
def test_classifier_metrics_rank_a_trained_model_above_an_untrained_one(
    tmp_path: Path, classifier: Path, fmnist_root: Path
) -> None:
    """The demo's setting with 8x8 patches (DiS-T/8: a third of the demo's compute per image),
    shortened to 600 steps (the native scan, as the demo runs it):
    evaluation during training, logged to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dis_dist.config import load_config
    from dis_dist.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "demo_fmnist.yaml", [
        f"run_dir={tmp_path / 'run'}", "data.source=fmnist", f"data.root={fmnist_root}", "model.name=DiS-T/8",
        "data.image_size=32",
        "train.steps=600",
        "sample.every=0", "sample.steps=ddim20", "sample.sampler=ddim", "checkpoint.every=0", "log.every=100",
        "eval.every=600", "eval.features=fmnist", f"eval.weights={classifier}",
        f"eval.reference={fmnist_root}", "eval.num_samples=200", "eval.batch_size=100",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine crawl (spinning OpenMP workers)
    try:
        trainer = Trainer(cfg)
        untrained = trainer.evaluator(trainer.strategy.ema_model(all_ranks=True), trainer.sample_diffusion)
        result = trainer.fit(resume="none")
    finally:
        torch.set_num_threads(threads)
    trained = result.metrics
    print(f"untrained: {untrained}\ntrained: {trained}")
    assert set(trained) == {"fd", "accuracy", "precision", "recall"}
    assert trained["accuracy"] > untrained["accuracy"] + 0.1
    assert trained["fd"] < 0.5 * untrained["fd"]
    assert trained["precision"] > untrained["precision"]
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert {"eval/fd", "eval/accuracy"} <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/accuracy")[-1].value == pytest.approx(trained["accuracy"])


def test_fid_tool_scores_an_npz_against_fashion_mnist(tmp_path: Path, classifier: Path, fmnist_root: Path) -> None:
    """Real test images as 'samples' (with their labels): accurate, and close to the reference."""
    test = open_images(str(fmnist_root), limit=600)
    images = np.repeat(next(test.batches(600)), 3, axis=-1)  # ADM's N x H x W x 3
    write_npz(tmp_path / "real.npz", {"arr_0": (images.shape, np.uint8, [images]),
                                      "arr_1": ((600,), np.int64, [test.labels])})
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    write_npz(tmp_path / "noise.npz", {"arr_0": (noise.shape, np.uint8, [noise]),
                                       "arr_1": ((600,), np.int64, [test.labels])})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIS_DIST_CACHE": str(tmp_path / "cache")}

    def fid(samples: str) -> dict:
        cmd = [sys.executable, str(ROOT / "tools" / "fid.py"), str(tmp_path / samples), str(fmnist_root),
               "--features", "fmnist", "--weights", str(classifier), "--json", str(tmp_path / "m.json")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "conditional accuracy" in proc.stdout
        return json.loads((tmp_path / "m.json").read_text())

    real, noisy = fid("real.npz"), fid("noise.npz")
    assert real["accuracy"] > 0.75 and noisy["accuracy"] < 0.3
    assert real["fd"] < 0.1 * noisy["fd"]
    assert real["precision"] > 0.8 and noisy["precision"] < 0.1
    assert len(list((tmp_path / "cache" / "eval").glob("ref-fmnist-*.npz"))) == 1  # computed once, reused
    # Without Inception weights, the error says what to download and where.
    env["TORCH_HOME"] = str(tmp_path / "nohub")
    env.pop(inception.WEIGHTS_ENV, None)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fid.py"), str(tmp_path / "real.npz"),
                           str(fmnist_root)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and inception.WEIGHTS_URL in proc.stderr


def test_evaluation_settings_fail_before_training(tmp_path: Path, classifier: Path, fmnist_root: Path) -> None:
    from dis_dist.config import load_config
    from dis_dist.train.trainer import Trainer

    base = [f"run_dir={tmp_path}", "data.source=fmnist", f"data.root={fmnist_root}", "eval.every=10",
            "eval.features=fmnist"]
    with pytest.raises(ConfigError, match="eval.reference"):
        Trainer(load_config(None, [*base, "eval.reference="]))
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(load_config(None, [*base, f"eval.weights={classifier}", f"eval.reference={tmp_path / 'nowhere'}"]))
    with pytest.raises(ConfigError, match="train_fmnist_classifier"):
        Trainer(load_config(None, [*base, f"eval.weights={tmp_path / 'none.pt'}", f"eval.reference={fmnist_root}"]))
