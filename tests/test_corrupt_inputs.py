"""Corrupt inputs end as the project's own errors: damaged shards are skipped and counted (or, under
``data.on_error=raise``, one DataError naming the shard file), damaged manifests and config files
are a DataError / ConfigError with a message and exit status 2. Never another exception type, never
a hang. The fuzz tests draw a few hundred random damages each, from fixed seeds."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from dis_dist.config import RunConfig, load_config, to_dict
from dis_dist.data.manifest import MANIFEST, load_manifest
from dis_dist.data.stream import ShardStream, StreamLoader, StreamSpec
from dis_dist.errors import ConfigError, DataError

from .conftest import write_small_cache

ROOT = Path(__file__).resolve().parents[1]
FUZZ_CASES = 300


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shards of 6 samples: 2-channel 8x8 latents with flip variants, 3 classes."""
    return write_small_cache(tmp_path_factory.mktemp("small_cache") / "cache")


def _member_offsets(data: bytes, suffix: str = "") -> list[int]:
    """Header offsets of the shard's members (those whose name ends with ``suffix``)."""
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar.getmembers() if m.name.endswith(suffix)]


def _damage(data: bytes, rng: random.Random) -> bytes:
    """One random damage: flipped bytes (anywhere, or in a member header), a truncation, or
    inserted bytes."""
    out = bytearray(data)
    kind = rng.choice(["flip", "flip_header", "flip_header", "truncate", "insert"])
    if kind == "truncate":
        return bytes(out[: rng.randrange(len(out))])
    if kind == "insert":
        at = rng.randrange(len(out))
        return bytes(out[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 600))) + out[at:])
    offsets = _member_offsets(data)
    for _ in range(rng.randint(1, 4)):
        if kind == "flip_header":
            at = rng.choice(offsets) + rng.randrange(512)
        else:
            at = rng.randrange(len(out))
        out[at] ^= rng.randint(1, 255)
    return bytes(out)


@pytest.mark.parametrize("verify", ["size", "none"])
def test_shard_reader_fuzz(small_cache, tmp_path, verify):
    """Every damaged shard is either read with all its samples valid (the damage hit array
    data: the values change, nothing else) or refused with a DataError naming the shard."""
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    manifest = load_manifest(str(cache))
    victim = cache / manifest.shards[0].name
    original = victim.read_bytes()
    stream = ShardStream(manifest, StreamSpec(url=str(cache), batch_size=4, verify=verify))
    rng = random.Random(f"shards-{verify}")
    outcomes = {"read": 0, "refused": 0}
    for case in range(FUZZ_CASES):
        victim.write_bytes(_damage(original, rng))
        try:
            samples = stream.read_samples(0)
        except DataError as e:
            assert manifest.shards[0].name in str(e), (case, str(e))
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        assert len(samples) == 6
        x, y = stream._batch(samples[:4], torch.Generator().manual_seed(case))
        assert x.shape == (4, 2, 8, 8) and torch.isfinite(x).all()
        assert all(0 <= label < 3 for label in y.tolist())
    print(f"verify={verify}: {outcomes}")
    assert outcomes["refused"] > FUZZ_CASES // 2  # most damage is caught, not just survived


@pytest.mark.parametrize("how", ["size_field", "npy_magic"])
def test_damaged_shard_is_skipped_and_counted_or_raises_naming_it(small_cache, tmp_path, how):
    """The two damages of the issue report: two flipped bytes in a tar header's size field (a
    ValueError traceback before), a flipped .npy magic byte (a DataError naming the sample, raised
    under on_error=skip too)."""
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    manifest = load_manifest(str(cache))
    victim = cache / manifest.shards[2].name
    data = bytearray(victim.read_bytes())
    first = _member_offsets(bytes(data), ".npy")[0]
    if how == "size_field":
        data[first + 124] ^= 0x40
        data[first + 125] ^= 0x40
    else:
        data[first + 512] ^= 0x01  # the first array's payload starts with b"\x93NUMPY"
    victim.write_bytes(bytes(data))
    loader = StreamLoader(StreamSpec(url=str(cache), batch_size=4, shuffle_buffer=2, verify="size"))
    batches = [next(loader) for _ in range(9)]  # more than one epoch of the 3 good shards
    assert loader.shard_errors >= 1 and all(torch.isfinite(x).all() for x, _ in batches)
    strict = StreamLoader(StreamSpec(url=str(cache), batch_size=4, on_error="raise", verify="size"))
    with pytest.raises(DataError, match=rf"shard .*{manifest.shards[2].name}"):
        for _ in range(9):
            next(strict)


def _random_json(rng: random.Random, depth: int = 0) -> object:
    makers = [
        lambda: None, lambda: True, lambda: rng.randint(-3, 3), lambda: 10 ** rng.randint(5, 30),
        lambda: rng.uniform(-1e9, 1e9), lambda: math.nan,
        lambda: "".join(rng.choice("ab/._-x0 ") for _ in range(rng.randint(0, 8))),
        lambda: [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        lambda: {rng.choice(["name", "x", "samples"]): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 2))},
    ]
    return rng.choice(makers[: 9 if depth < 2 else 7])()


def _paths(tree: object, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON/YAML tree (the root included)."""
    out = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            out += _paths(value, (*prefix, i))
    return out


def _mutate(tree: object, rng: random.Random) -> object:
    """Replace a random node with a random value, or delete a random key."""
    tree = copy.deepcopy(tree)
    path = rng.choice(_paths(tree))
    value = _random_json(rng)
    if not path:
        return value
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return tree


def test_manifest_fuzz(small_cache, tmp_path):
    """A manifest with random values anywhere: the loader starts and streams valid batches, or
    stops with a DataError."""
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    good = json.loads((small_cache / MANIFEST).read_text())
    rng = random.Random("manifests")
    outcomes = {"read": 0, "refused": 0}
    for case in range(FUZZ_CASES):
        (cache / MANIFEST).write_text(json.dumps(_mutate(good, rng)))
        try:
            loader = StreamLoader(StreamSpec(url=str(cache), batch_size=4, shuffle_buffer=2, on_error="raise"))
            x, y = next(loader)
        except DataError as e:
            assert str(e), case
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        assert x.shape[0] == 4 and torch.isfinite(x).all()
    print(outcomes)
    assert outcomes["refused"] > FUZZ_CASES // 2


def test_config_file_fuzz(tmp_path):
    """A YAML config with random values anywhere: a RunConfig or a ConfigError, nothing else."""
    good = yaml.safe_load((ROOT / "configs" / "demo_fmnist.yaml").read_text())
    rng = random.Random("configs")
    path = tmp_path / "fuzz.yaml"
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(FUZZ_CASES):
        path.write_text(yaml.safe_dump(_mutate(good, rng)))
        try:
            cfg = load_config(path)
        except ConfigError as e:
            assert str(e), case
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        assert isinstance(cfg, RunConfig)
        assert all(math.isfinite(v) for v in _floats(to_dict(cfg)))
    print(outcomes)
    assert outcomes["refused"] > FUZZ_CASES // 2


def _floats(tree: object) -> list[float]:
    if isinstance(tree, dict):
        return [f for v in tree.values() for f in _floats(v)]
    if isinstance(tree, list):
        return [f for v in tree for f in _floats(v)]
    return [tree] if isinstance(tree, float) else []


def _float_keys(cfg: RunConfig) -> list[str]:
    import dataclasses
    import typing

    keys = []
    for section in dataclasses.fields(cfg):
        hints = typing.get_type_hints(type(getattr(cfg, section.name))) if dataclasses.is_dataclass(
            getattr(cfg, section.name)) else {}
        keys += [f"{section.name}.{k}" for k, h in hints.items() if h is float]
    return keys


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_every_float_key_rejects_nan_and_infinity(value):
    keys = _float_keys(RunConfig())
    assert "optim.lr" in keys and "optim.grad_clip" in keys and len(keys) >= 10
    for key in keys:
        with pytest.raises(ConfigError, match=rf"{key}: expected a finite number"):
            load_config(None, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=r"optim.betas\[1\]: expected a finite number"):
        load_config(None, [f"optim.betas=[0.9, {value}]"])


@pytest.mark.parametrize("text", ["- train\n- steps\n", "just a string\n", "42\n"])
def test_a_config_file_that_is_not_a_mapping(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file '{path}' must be a mapping of sections"):
        load_config(path)


@pytest.mark.parametrize("case", ["config_list", "nan_lr", "manifest_list"])
def test_cli_exits_2_with_one_line(tmp_path, small_cache, case):
    args = [sys.executable, "-m", "dis_dist.train", f"run_dir={tmp_path / 'run'}"]
    if case == "config_list":
        (tmp_path / "c.yaml").write_text("- 1\n- 2\n")
        args += ["--config", str(tmp_path / "c.yaml")]
        expected = "must be a mapping"
    elif case == "nan_lr":
        args += ["optim.lr=.nan"]
        expected = "optim.lr: expected a finite number"
    else:
        cache = tmp_path / "cache"
        shutil.copytree(small_cache, cache)
        (cache / MANIFEST).write_text("[1, 2, 3]")
        args += ["data.source=shards", f"data.url={cache}", "data.image_size=8", "model.name=DiS-T/8"]
        expected = "not a valid manifest"
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr and "Traceback" not in result.stderr
