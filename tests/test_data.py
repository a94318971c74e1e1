"""IDX reading, Fashion-MNIST loading and the resumable batch loader."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from dis_dist.data import BatchLoader, ImageDataset, load_fmnist
from dis_dist.data.idx import read_idx
from dis_dist.errors import DataError


def _write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_idx_round_trip_plain_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    _write_idx(tmp_path / "b", array, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "b"), array)


def test_idx_corrupt_files_raise_data_error(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")
    array = np.zeros((2, 3), dtype=np.uint8)
    _write_idx(tmp_path / "short", array, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "broken.gz")


def test_missing_fmnist_names_the_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fmnist(tmp_path)


def test_fmnist_from_idx_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 8, 9], dtype=np.uint8))
    ds = load_fmnist(tmp_path, "test", 32)
    assert ds.images.shape == (5, 1, 32, 32) and ds.num_classes == 10
    assert torch.equal(ds.images[:, 0, 2:30, 2:30], torch.from_numpy(images))
    assert ds.images[:, :, :2].sum() == 0 and ds.images[:, :, :, 30:].sum() == 0
    x, y = ds.batch(torch.tensor([0, 4]))
    assert x.min() >= -1 and x.max() <= 1 and y.tolist() == [0, 9]


def test_real_fmnist(fmnist_root):
    train = load_fmnist(fmnist_root, "train", 32)
    test = load_fmnist(fmnist_root, "test", 32)
    assert len(train) == 60_000 and len(test) == 10_000
    assert train.images.shape[1:] == (1, 32, 32) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert train.class_names[1] == "Trouser"


def _dataset(n=50) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageDataset(images=images, labels=torch.arange(n), class_names=tuple("abcde"))


def test_loader_epochs_are_permutations_and_deterministic():
    loader = BatchLoader(_dataset(), 10, seed=3)
    first_epoch = torch.cat([next(loader)[1] for _ in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(50))
    second_epoch = torch.cat([next(loader)[1] for _ in range(5)])
    assert sorted(second_epoch.tolist()) == list(range(50))
    assert not torch.equal(first_epoch, second_epoch)
    again = BatchLoader(_dataset(), 10, seed=3)
    assert torch.equal(torch.cat([next(again)[1] for _ in range(5)]), first_epoch)


def test_loader_ranks_are_disjoint():
    seen = [torch.cat([next(BatchLoader(_dataset(), 5, seed=1, rank=r, world_size=2))[1]]) for r in (0, 1)]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_loader_resumes_at_its_position():
    a = BatchLoader(_dataset(), 8, seed=0, random_flip=True)
    for _ in range(9):  # crosses an epoch boundary (6 batches per epoch)
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(4)]
    b = BatchLoader(_dataset(), 8, seed=0, random_flip=True)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (next(b) for _ in range(4))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_random_flip_flips_some_images():
    images = torch.zeros(64, 1, 1, 2, dtype=torch.uint8)
    images[..., 0] = 255
    ds = ImageDataset(images=images, labels=torch.zeros(64, dtype=torch.long), class_names=("a",))
    x, _ = next(BatchLoader(ds, 64, seed=0, random_flip=True))
    flipped = (x[..., 0] < 0).sum().item()
    assert 10 < flipped < 54


def test_loader_rejects_too_small_dataset():
    with pytest.raises(DataError, match="fewer than one micro-batch"):
        BatchLoader(_dataset(10), 8, seed=0, world_size=2)


# -- the encoder's fast paths: the same bytes as the general ones --------------------------------

def test_build_shard_writes_tarwriters_bytes():
    """Headers filled in directly: the same bytes as webdataset's TarWriter, with and without
    flips; keys a ustar header cannot hold (long, non-ASCII) go through TarWriter itself."""
    from webdataset import TarWriter

    from dis_dist.data.tar import build_shard, tar_members

    def reference(samples):
        import io

        buf = io.BytesIO()
        with TarWriter(buf, encoder=False, mtime=0) as tar:
            for s in samples:
                sample = {"__key__": s["key"], "cls": str(int(s["cls"])).encode()}
                for name in ("latent", "latent_flip"):
                    if s.get(name) is not None:
                        out = io.BytesIO()
                        np.save(out, s[name], allow_pickle=False)
                        sample[f"{name}.npy"] = out.getvalue()
                tar.write(sample)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    for keys in ([f"{i:09d}" for i in range(37)], ["k" * 84, "x"], ["k" * 85], ["caf\u00e9"]):
        samples = [{"key": k, "cls": int(rng.integers(1000)),
                    "latent": rng.standard_normal((int(rng.integers(1, 4)), 5, 7)).astype(np.float16),
                    "latent_flip": rng.standard_normal((2, 3)).astype(np.float32) if i % 2 else None}
                   for i, k in enumerate(keys)]
        data = build_shard(samples)
        assert data == reference(samples)
        assert len(list(tar_members(memoryview(data)))) == sum(3 if i % 2 else 2 for i in range(len(keys)))


def test_npy_bytes_are_np_saves():
    import io

    from dis_dist.data.tar import _npy, npy_array

    for array in (np.zeros((3, 4), np.float32), np.arange(7), np.float16(3.5) * np.ones(()),
                  np.ones((2, 3, 4))[:, ::2], np.asfortranarray(np.ones((3, 5))), np.ones((2, 28, 28), ">f4")):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        assert _npy(array) == buf.getvalue()
        if not np.isfortran(array):  # the reader takes C order only, what the encoder writes
            np.testing.assert_array_equal(npy_array(_npy(array)), array)


def test_pixel_encoder_table_is_the_tensor_paths_values():
    """The lookup table gives the bits of encode(to_tensor(...)) for every pixel value, in
    (n, H, W) and (n, H, W, C) layouts."""
    from PIL import Image

    from dis_dist.data.encoders import PixelEncoder
    from tests.fixtures import to_tensor

    enc = PixelEncoder()
    rng = np.random.default_rng(0)
    gray = np.concatenate([np.arange(256, dtype=np.uint8).reshape(4, 8, 8),
                           rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)])
    rgb = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    for images in (gray, rgb):
        fast = enc.encode_uint8(images)
        slow = enc.encode(to_tensor([Image.fromarray(im) for im in images])).numpy()
        assert fast.dtype == np.float16 and fast.shape == slow.shape and fast.flags.c_contiguous
        assert fast.tobytes() == slow.tobytes()


def test_pad_array_is_pad_to():
    from PIL import Image

    from dis_dist.data.sources import pad_array, pad_to

    rng = np.random.default_rng(0)
    for shape in ((28, 28), (28, 27), (5, 9, 3)):
        image = rng.integers(1, 256, shape, dtype=np.uint8)
        for size in (28, 29, 32):
            if max(shape[:2]) <= size:
                assert np.array_equal(pad_array(image, size), np.asarray(pad_to(Image.fromarray(image), size)))
    with pytest.raises(DataError, match="does not fit"):
        pad_array(np.zeros((30, 28), np.uint8), 28)
