"""The latent-cache pipeline: encode -> shards + manifest -> streaming loader -> trainer,
locally and against a real S3 endpoint (moto_server on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dis_dist.data import fs
from dis_dist.data.encode import encode, parse_args
from dis_dist.data.manifest import MANIFEST, finished_shards, load_manifest, shard_name
from dis_dist.data.shards import read_shard
from dis_dist.data.stream import ShardStream, StreamLoader, StreamSpec
from dis_dist.data.tar import npy_array
from dis_dist.errors import DataError
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 7 images of assorted sizes and modes, plus one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(7):
            h, w = rng.integers(36, 80, size=2)
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            arr[..., c] = 255  # class-coloured, so labels can be checked from pixels
            mode = "L" if i == 3 else "RGB"
            Image.fromarray(arr).convert(mode).save(root / name / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    require(_has("diffusers"), "diffusers (pip install diffusers)")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _encode(*argv: str):  # noqa: ANN202
    return encode(parse_args(["--no-progress", *argv]))


def _all_keys(url: str, manifest, world: int, workers: int, epoch: int, options=None) -> list[list[str]]:
    """Keys each (rank, worker) stream reads in ``epoch``."""
    out = []
    for rank in range(world):
        stream = ShardStream(manifest, StreamSpec(url=url, batch_size=1, rank=rank, world_size=world,
                                                  shuffle_buffer=5, options=options or {}))
        for w in range(workers):
            out.append([s["__key__"] for s in stream._raw_epoch(epoch, w, workers, [0])])
    return out


# -- local round trip -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_cache(image_folder, tiny_vae, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "vae32"
    result = _encode("--input", str(image_folder), "--output", str(out), "--vae", str(tiny_vae),
                     "--resolution", "32", "--shard-size", "4", "--batch-size", "3")
    assert result.manifest is not None
    return out


def test_encode_writes_shards_and_manifest(vae_cache, tiny_vae):
    manifest = load_manifest(str(vae_cache))
    info = manifest.info
    assert info.class_names == CLASSES and info.latent_kind == "moments" and info.has_flip
    assert info.latent_shape == [8, 16, 16] and info.channels == 4 and info.latent_dtype == "float16"
    assert info.vae == str(tiny_vae) and info.scaling_factor == pytest.approx(0.18215)
    assert manifest.total_samples == 21 and len(manifest.shards) == 6  # 22 files, one corrupt
    assert [s.source.rsplit("/", 1)[-1] for s in manifest.skipped] == ["broken.jpg"]
    assert "unreadable image" in manifest.skipped[0].reason
    import hashlib

    for shard in manifest.shards:
        data = (vae_cache / shard.name).read_bytes()
        assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
    assert not list(vae_cache.glob("*.tmp-*"))


def test_every_sample_once_per_epoch_over_ranks_and_workers(vae_cache):
    manifest = load_manifest(str(vae_cache))
    for epoch in (0, 1):
        per_stream = _all_keys(str(vae_cache), manifest, world=2, workers=2, epoch=epoch)
        keys = [k for part in per_stream for k in part]
        assert len(keys) == len(set(keys)) == manifest.total_samples
    assert _all_keys(str(vae_cache), manifest, 2, 2, 0) != _all_keys(str(vae_cache), manifest, 2, 2, 1)


def test_latents_labels_and_flips_match_direct_encoding(vae_cache, image_folder, tiny_vae):
    from diffusers import AutoencoderKL

    from dis_dist.data.shards import decode_sample, iter_shard
    from dis_dist.data.sources import center_crop
    from dis_dist.data.sources import image_folder as folder_source
    from tests.fixtures import to_tensor

    source = folder_source(str(image_folder), shard_size=4, seed=0)
    items = {it.key: it for unit in source.units for it in unit()}
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    manifest = load_manifest(str(vae_cache))
    with open(vae_cache / manifest.shards[0].name, "rb") as f:
        samples = list(iter_shard(f, verify=manifest.shards[0]))
    assert len(samples) == manifest.shards[0].samples
    for sample in samples:
        latent, flip, label = decode_sample(sample)
        item = items[sample["__key__"]]
        assert CLASSES[label] == Path(item.origin).parent.name  # the label is the image's folder
        image = center_crop(item.load().convert("RGB"), 32)
        x = to_tensor([image])
        with torch.no_grad():
            direct = vae.encode(x).latent_dist
            direct_flip = vae.encode(x.flip(-1)).latent_dist
        sf = manifest.info.scaling_factor
        np.testing.assert_allclose(latent[:4], (direct.mean[0] * sf).numpy(), rtol=1e-2, atol=2e-3)
        np.testing.assert_allclose(latent[4:], (direct.std[0] * sf).numpy(), rtol=1e-2, atol=2e-3)
        np.testing.assert_allclose(flip[:4], (direct_flip.mean[0] * sf).numpy(), rtol=1e-2, atol=2e-3)


KILLED_RANK = """
import multiprocessing, os, signal, sys
from dis_dist.data.stream import StreamLoader, StreamSpec

if __name__ == "__main__":
    loader = StreamLoader(StreamSpec(url=sys.argv[1], batch_size=2, num_workers=2))
    if sys.argv[2] == "started":
        next(loader)
    else:
        loader._start()  # workers spawned, still importing torch when their rank dies
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would
"""


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None


def _running(pid: int, started: str) -> bool:
    """The process ``pid`` that started at ``started`` (a reused pid is another process) runs."""
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


@pytest.mark.parametrize("killed", ["started", "starting"])
def test_loader_workers_exit_when_their_rank_is_killed(tmp_path, killed):
    """A killed rank's DataLoader workers see it gone and exit (they once outlived it, holding
    their memory and the launcher's output pipe, when a fork server was their parent; and when
    the rank died while they were still starting, before PyTorch's watchdog noted its pid)."""
    from tests.fixtures import write_random_cache

    cache = write_random_cache(tmp_path / "cache", shards=4, per_shard=4, channels=4, size=8, classes=3)
    script = tmp_path / "rank.py"
    script.write_text(KILLED_RANK)
    proc = subprocess.Popen([sys.executable, str(script), str(cache), killed], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    started = {pid: (_stat(pid) or [""] * 20)[19] for pid in workers}  # start times tell reused pids apart
    assert proc.wait(timeout=60) == -9 and len(workers) == 2

    def alive() -> bool:
        return any(_running(pid, started[pid]) for pid in workers)

    deadline = time.monotonic() + 30  # the workers look for their parent every 5 s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive()
    assert proc.stdout.read() == ""  # EOF: no worker holds the pipe open any more
    proc.stdout.close()


def test_loader_draws_from_the_moments_and_resumes_exactly(vae_cache):
    spec = StreamSpec(url=str(vae_cache), batch_size=3, seed=5, num_workers=2, shuffle_buffer=4)
    first = StreamLoader(spec)
    for _ in range(5):
        x, y = next(first)
        assert x.shape == (3, 4, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    state = first.state_dict()
    expected = [next(first) for _ in range(6)]  # crosses into the second epoch (21 samples)
    resumed = StreamLoader(spec)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (next(resumed) for _ in range(6))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # Each batch draws afresh from the moments: the same sample, another batch, another latent.
    manifest = load_manifest(str(vae_cache))
    stream = ShardStream(manifest, StreamSpec(url=str(vae_cache), batch_size=1, random_flip=False))
    raw = next(stream._raw_epoch(0, 0, 1, [0]))
    a, _ = stream._batch([raw], torch.Generator().manual_seed(1))
    b, _ = stream._batch([raw], torch.Generator().manual_seed(2))
    again, _ = stream._batch([raw], torch.Generator().manual_seed(1))
    assert a.shape == (1, 4, 16, 16) and not torch.allclose(a, b) and torch.equal(a, again)

    moments = torch.from_numpy(npy_array(raw["latent.npy"]).astype(np.float32))
    eps = (a[0] - moments[:4]) / moments[4:]  # a = mean + std * eps with eps ~ N(0, 1)
    assert abs(eps.mean()) < 0.1 and 0.9 < eps.std() < 1.1


def test_encode_resumes_without_reencoding(image_folder, tmp_path, monkeypatch):
    from dis_dist.data import encode as encode_module
    from dis_dist.data.encoders import PixelEncoder

    calls = []
    original = PixelEncoder.encode_uint8

    def counting(self, x, generator=None):
        calls.append(len(x))
        return original(self, x, generator)

    monkeypatch.setattr(PixelEncoder, "encode_uint8", counting)
    written = []
    real_write = encode_module.write_shard

    def dying_write(*args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt  # the job is killed after three shards
        written.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(encode_module, "write_shard", dying_write)
    out = tmp_path / "px"
    argv = ["--input", str(image_folder), "--output", str(out), "--resolution", "32", "--shard-size", "4",
            "--no-flip"]
    with pytest.raises(KeyboardInterrupt):
        _encode(*argv)
    assert finished_shards(str(out)) == {shard_name(i) for i in range(3)}
    assert not (out / MANIFEST).exists()
    monkeypatch.setattr(encode_module, "write_shard", real_write)
    calls.clear()
    result = _encode(*argv)
    assert result.skipped_existing == [shard_name(i) for i in range(3)]
    assert result.encoded == [shard_name(i) for i in range(3, 6)]
    manifest = load_manifest(str(out))
    assert manifest.total_samples == 21
    # The shape probe, then only the unfinished shards' images.
    assert sum(calls) == 1 + sum(s.samples for s in manifest.shards[3:])


def test_two_workers_split_the_shards(image_folder, tmp_path):
    out = tmp_path / "split"
    argv = ["--input", str(image_folder), "--output", str(out), "--resolution", "32", "--shard-size", "4"]
    first = _encode(*argv, "--rank", "0", "--world-size", "2")
    assert first.encoded == [shard_name(i) for i in (0, 2, 4)] and first.manifest is None
    second = _encode(*argv, "--rank", "1", "--world-size", "2")
    assert second.encoded == [shard_name(i) for i in (1, 3, 5)] and second.manifest is not None
    assert _encode(*argv, "--finalize").manifest.total_samples == 21


def test_truncated_shard_is_skipped_or_raises(vae_cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(vae_cache, broken)
    manifest = load_manifest(str(broken))
    victim = broken / manifest.shards[1].name
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    stream = ShardStream(manifest, StreamSpec(url=str(broken), batch_size=4, shuffle_buffer=2))
    errors = [0]
    keys = [s["__key__"] for s in stream._raw_epoch(0, 0, 1, errors)]
    assert len(keys) == manifest.total_samples - manifest.shards[1].samples and errors == [1]
    loader = StreamLoader(StreamSpec(url=str(broken), batch_size=4, shuffle_buffer=2))
    for _ in range(5):
        next(loader)
    assert loader.shard_errors == 1  # counted (a TensorBoard scalar), training goes on
    strict = StreamLoader(StreamSpec(url=str(broken), batch_size=4, on_error="raise"))
    with pytest.raises(DataError, match=manifest.shards[1].name):
        for _ in range(10):
            next(strict)


def test_missing_manifest_names_the_url(tmp_path):
    with pytest.raises(DataError, match=f"no manifest at '{tmp_path}/{MANIFEST}'"):
        load_manifest(str(tmp_path))


def test_encode_cli_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "dis_dist.data.encode", "--no-progress", *args],
                              capture_output=True, text=True, cwd=ROOT)

    missing = run("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "x.png")
    no_vae = run("--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "o"), "--vae", str(tmp_path / "novae"))
    assert no_vae.returncode == 2 and "cannot load the VAE" in no_vae.stderr


def test_fmnist_pixels_cache_trains(fmnist_root, tmp_path):
    from dis_dist.config import load_config
    from dis_dist.train.trainer import Trainer

    cache = tmp_path / "fmnist"
    result = _encode("--input", str(fmnist_root), "--output", str(cache), "--vae", "pixels", "--split", "test",
                     "--resolution", "28", "--shard-size", "2500", "--no-flip")
    info = result.manifest.info
    assert info.latent_kind == "pixels" and info.latent_shape == [1, 28, 28] and result.manifest.total_samples == 10_000
    cfg = load_config(ROOT / "configs" / "demo_fmnist.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.url={cache}", "data.num_workers=2", "train.steps=2",
        "train.global_batch=8", "train.micro_batch=8", "sample.every=0", "sample.num=10", "sample.steps=2",
        "eval.every=0",
    ])
    fit = Trainer(cfg).fit()
    assert fit.step == 2 and np.isfinite(fit.final_loss) and fit.samples_png.is_file()


def test_fmnist_array_path_writes_the_pil_paths_bytes(tmp_path, monkeypatch):
    """Fashion-MNIST items encode from their arrays (no PIL, a lookup table, headers filled in
    directly): the shards are byte for byte those of the PIL + torch + TarWriter path, padded
    (31: unequal margins) or not (28)."""
    from dis_dist.data import encode as encode_module
    from dis_dist.data import sources, tar
    from dis_dist.data.encoders import PixelEncoder
    from tests.fixtures import to_tensor
    from tests.test_data import _write_idx

    rng = np.random.default_rng(0)
    root = tmp_path / "fm"
    root.mkdir()
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (23, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 23))
    fast = {res: _encode("--input", str(root), "--output", str(tmp_path / f"fast{res}"), "--vae", "pixels",
                         "--resolution", str(res), "--shard-size", "10", "--batch-size", "4") for res in (28, 31)}

    real_source = sources.fashion_mnist

    def without_arrays(*args, **kwargs):
        source = real_source(*args, **kwargs)
        units = source.units
        source.units = [lambda u=u: (dataclasses.replace(it, array=None) for it in u()) for u in units]
        return source

    monkeypatch.setattr(sources, "fashion_mnist", without_arrays)
    def through_pil_and_torch(self, images, generator=None):
        return self.encode(to_tensor([Image.fromarray(im) for im in images])).numpy()

    monkeypatch.setattr(PixelEncoder, "encode_uint8", through_pil_and_torch)
    monkeypatch.setattr(encode_module, "build_shard", tar._build_shard_tarwriter)
    for res in (28, 31):
        slow = _encode("--input", str(root), "--output", str(tmp_path / f"slow{res}"), "--vae", "pixels",
                       "--resolution", str(res), "--shard-size", "10", "--batch-size", "4")
        assert slow.manifest.total_samples == 23 and len(slow.manifest.shards) == 3
        assert slow.manifest.shards == fast[res].manifest.shards  # names, sizes and sha256 of the bytes


# -- S3 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 endpoint: moto_server on a free local port, with the bucket dis-test."""
    from tests.s3server import local_s3, moto_server_path

    require(moto_server_path() is not None and _has("s3fs"), "moto_server and s3fs (pip install 'moto[server]' s3fs)")
    with local_s3("dis-test") as url:
        yield url


@pytest.mark.slow
def test_s3_round_trip_encode_stream_train(s3_endpoint, image_folder, tiny_vae, tmp_path):
    url = "s3://dis-test/vae32"
    result = _encode("--input", str(image_folder), "--output", url, "--vae", str(tiny_vae), "--resolution", "32",
                     "--shard-size", "4", "--batch-size", "4")
    assert result.manifest.total_samples == 21
    fsys, path = fs.filesystem(url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fsys.ls(path)) == sorted(
        [MANIFEST, "_fragments"] + [shard_name(i) for i in range(6)])
    manifest = load_manifest(url)
    keys = [k for part in _all_keys(url, manifest, world=2, workers=2, epoch=0) for k in part]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 21
    # Through a local cache directory, with DataLoader workers (forked processes).
    cache_dir = tmp_path / "shard-cache"
    loader = StreamLoader(StreamSpec(url=url, batch_size=7, num_workers=2, cache_dir=str(cache_dir)))
    assert sum(len(next(loader)[1]) for _ in range(3)) == 21
    assert len(list(cache_dir.iterdir())) > 0

    from dis_dist.config import load_config
    from dis_dist.train.trainer import Trainer

    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "data.source=shards", f"data.url={url}", "data.image_size=16",
        "data.num_workers=0", "model.name=DiS-T/8", "train.steps=2", "train.global_batch=4",
        "train.micro_batch=4", "sample.every=0", "sample.num=3", "sample.steps=2",
    ])
    fit = Trainer(cfg).fit()
    assert fit.step == 2 and np.isfinite(fit.final_loss)


def test_s3_without_credentials_fails_at_start(s3_endpoint, image_folder, monkeypatch, tmp_path):
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(DataError, match="cannot access 's3://dis-test/nocreds'.*Credentials"):
        _encode("--input", str(image_folder), "--output", "s3://dis-test/nocreds", "--resolution", "32")
    s3fs.S3FileSystem.clear_instance_cache()


def test_webdataset_reads_every_sample_of_our_cache(vae_cache):
    """The shards are plain webdataset: its own reader sees every sample of the manifest, with
    the arrays and labels the project's reader decodes."""
    import webdataset as wds

    manifest = load_manifest(str(vae_cache))
    urls = [str(vae_cache / s.name) for s in manifest.shards]
    theirs = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    ours = [raw for url in urls for raw in read_shard(Path(url).read_bytes())]
    assert len(theirs) == manifest.total_samples == len(ours) == 21
    for t, o in zip(theirs, ours):
        assert t["__key__"] == o["__key__"] and t["cls"] == int(bytes(o["cls"]))
        for ext in ("latent.npy", "latent_flip.npy"):
            assert t[ext].dtype == np.float16 and np.array_equal(t[ext], npy_array(o[ext]))


@pytest.mark.slow
def test_webdataset_reads_s3_through_our_handler(s3_endpoint, vae_cache):
    require(_has("webdataset"), "webdataset")
    import webdataset as wds

    fs.register_webdataset_handler()
    manifest = load_manifest(str(vae_cache))
    name = manifest.shards[0].name
    fs.filesystem("s3://dis-test")[0].put(str(vae_cache / name), f"dis-test/wds/{name}")
    samples = list(wds.WebDataset(f"s3://dis-test/wds/{name}", shardshuffle=False))
    assert len(samples) == manifest.shards[0].samples
    assert {"latent.npy", "latent_flip.npy", "cls"} <= set(samples[0])
