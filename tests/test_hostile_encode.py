"""Hostile inputs and outputs of the encoder (issue 26): special files among the images (a FIFO,
a link to /dev/zero, a directory named like an image, a dangling link, a link loop, a file over
the size cap) are skipped and counted with their reason, never a hang or the end of the run; a full
or read-only output disk is one error line (exit status 2) and leaves no temporary files.

The encoder runs in a subprocess with a timeout and an address-space limit, so that a hang or an
unbounded read fails the test instead of stalling or exhausting the machine. The output disks are
real: a tiny tmpfs (full), a tmpfs remounted read-only."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dis_dist.data.manifest import MANIFEST, load_manifest
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee"]
GOOD = 6  # good images (3 per class)
TIMEOUT_S = 60
MEMORY_LIMIT = 2 * 2**30  # address space of the encoder process: reading /dev/zero stops here


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(GOOD // len(CLASSES)):
            arr = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"img{i}.png")
    return root


def _encode(*args: str) -> subprocess.CompletedProcess:
    """The encode CLI in a subprocess; a hang past TIMEOUT_S fails the test."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    argv = [sys.executable, "-m", "dis_dist.data.encode", "--no-progress", "--vae", "pixels",
            "--resolution", "16", "--shard-size", "4", *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT_S, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"encode hung: no exit in {TIMEOUT_S} s")


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def _hostile(case: str, folder: Path) -> tuple[Path, str]:
    """Put one hostile entry into the ``bee`` class: (its path, the reason it is skipped for)."""
    bee = folder / "bee"
    if case == "fifo":
        os.mkfifo(bee / "x.jpg")
        return bee / "x.jpg", "not a regular file (FIFO)"
    if case == "dev_zero":
        (bee / "zero.jpg").symlink_to("/dev/zero")
        return bee / "zero.jpg", "not a regular file (character device)"
    if case == "directory":  # a link (a real sub-folder is walked into, a link is not)
        (bee / "dir.jpg").symlink_to(folder / "ant")
        return bee / "dir.jpg", "not a regular file (directory)"
    if case == "dangling":
        (bee / "gone.jpg").symlink_to(folder / "no-such-file.jpg")
        return bee / "gone.jpg", "broken symlink"
    if case == "loop":
        (bee / "loop.jpg").symlink_to("loop.jpg")
        (bee / "sub").mkdir()
        (bee / "sub" / "up").symlink_to("../..")  # a directory loop: the walk must not follow it
        return bee / "loop.jpg", "symlink loop"
    if case == "too_large":
        with open(bee / "huge.png", "wb") as f:  # sparse: 3 MB that take no disk
            f.truncate(3 * 2**20)
        return bee / "huge.png", "too large"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["fifo", "dev_zero", "directory", "dangling", "loop", "too_large"])
def test_special_file_among_images_is_skipped_and_counted(tmp_path, case):
    folder = _images(tmp_path / "images")
    path, why = _hostile(case, folder)
    out = tmp_path / "out"
    extra = ["--max-file-mb", "2"] if case == "too_large" else []
    result = _encode("--input", str(folder), "--output", str(out), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    manifest = load_manifest(str(out))
    assert manifest.total_samples == GOOD  # every good image encoded
    assert [(s.source, s.why) for s in manifest.skipped] == [(str(path), why)]
    assert str(path) in manifest.skipped[0].reason
    assert f"1 input skipped: 1 {why}" in result.stderr  # the per-reason count in the log
    assert not _leftovers(out)


def test_every_hostile_file_at_once_with_a_link_to_a_good_image(tmp_path):
    """All of them in one run, among links to real images (followed: they are regular files)."""
    folder = _images(tmp_path / "images")
    whys = [_hostile(case, folder)[1] for case in ("fifo", "dev_zero", "directory", "dangling", "loop")]
    (folder / "ant" / "linked.png").symlink_to(folder / "bee" / "img0.png")
    out = tmp_path / "out"
    result = _encode("--input", str(folder), "--output", str(out), "--shard-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_manifest(str(out))
    assert manifest.total_samples == GOOD + 1
    assert sorted(s.why for s in manifest.skipped) == sorted(whys)
    assert f"{len(whys)} inputs skipped: " in result.stderr


def test_nothing_but_hostile_files_is_one_error(tmp_path):
    """No input encodable: one line with the per-reason counts, not a manifest without shards."""
    folder = tmp_path / "images"
    (folder / "bee").mkdir(parents=True)
    _hostile("fifo", folder)
    out = tmp_path / "out"
    result = _encode("--input", str(folder), "--output", str(out))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "no input could be encoded (1 input skipped: 1 not a regular file (FIFO)" in result.stderr
    assert not (out / MANIFEST).exists() and not _leftovers(out)


def _image_shard(path: Path, first: int, count: int) -> None:
    from webdataset import TarWriter

    with TarWriter(str(path), encoder=False) as tar:
        for k in range(first, first + count):
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (k * 20, 0, 0)).save(buf, format="PNG")
            tar.write({"__key__": f"{k:04d}", "png": buf.getvalue(), "cls": str(k % 2).encode()})


@pytest.mark.parametrize("case", ["fifo", "dev_zero"])
def test_special_file_among_image_shards_is_skipped_and_counted(tmp_path, case):
    """The same rule for shard inputs: a .tar that is not a regular file is one skipped input."""
    shards = tmp_path / "shards"
    shards.mkdir()
    _image_shard(shards / "a.tar", 0, 3)
    _image_shard(shards / "c.tar", 3, 3)
    bad = shards / "b.tar"
    if case == "fifo":
        os.mkfifo(bad)
    else:
        bad.symlink_to("/dev/zero")
    out = tmp_path / "out"
    result = _encode("--input", str(shards), "--output", str(out), "--num-classes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_manifest(str(out))
    assert manifest.total_samples == 6 and len(manifest.shards) == 2
    assert [s.source for s in manifest.skipped] == [str(bad)]
    assert manifest.skipped[0].why.startswith("not a regular file")
    assert not _leftovers(out)


@contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``path`` (needs root; this project's test machines are)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    require(mounted.returncode == 0, f"mounting a tmpfs (root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_full_disk_is_one_error_and_leaves_no_temporary_files(tmp_path):
    folder = _images(tmp_path / "images")
    with _tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "cache"
        # 64x64 pixels with flips: ~49 KB a sample, so the first shard does not fit in 64 KB.
        args = ["--input", str(folder), "--output", str(out), "--resolution", "64"]
        line = _one_error_line(_encode(*args))
        assert "no space left" in line and str(out) in line, line
        assert not _leftovers(disk)
        # Space freed: a rerun finishes the cache, nothing lost.
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        result = _encode(*args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert load_manifest(str(out)).total_samples == GOOD
        assert not _leftovers(disk)


def test_read_only_output_is_one_error_at_start(tmp_path):
    folder = _images(tmp_path / "images")
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "cache").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for out in (disk / "cache", disk / "new"):  # an existing directory, one to be made
            line = _one_error_line(_encode("--input", str(folder), "--output", str(out)))
            assert "read-only" in line and str(out) in line, line
            assert "--output" in line  # the fix
        assert not _leftovers(disk) and not (disk / "new").exists()


def test_manifest_of_old_encodes_still_reads(tmp_path):
    """Skipped entries written before reasons were counted (no ``why``) still load."""
    from tests.conftest import write_small_cache

    cache = write_small_cache(tmp_path / "cache")
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["skipped"] = [{"key": "k", "source": "/x/y.jpg", "reason": "/x/y.jpg: unreadable image"}]
    (cache / MANIFEST).write_text(json.dumps(manifest))
    assert load_manifest(str(cache)).skipped[0].why == ""


def test_the_read_is_bounded_even_when_the_size_lies():
    """/proc files are regular and report size 0: the cap holds during the read itself."""
    import fsspec

    from dis_dist.data import fs

    local = fsspec.filesystem("file")
    assert os.stat("/proc/cpuinfo").st_size == 0
    with pytest.raises(fs.UnusableInput, match="/proc/cpuinfo: too large") as caught:
        fs.read_input(local, "/proc/cpuinfo", max_bytes=16)
    assert caught.value.why == "too large"
    assert fs.read_input(local, "/proc/cpuinfo", max_bytes=2**20).startswith(b"processor")


def test_object_store_inputs_follow_the_same_rules():
    """For fsspec file systems (s3://, ...) the rule goes through fs.info: type and size."""
    import fsspec

    from dis_dist.data import fs

    mem = fsspec.filesystem("memory")
    mem.pipe_file("/hostile/ok.png", b"x" * 10)
    mem.pipe_file("/hostile/big.png", b"x" * 100)
    mem.pipe_file("/hostile/dir.png/inner", b"x")
    assert fs.read_input(mem, "/hostile/ok.png", max_bytes=50) == b"x" * 10
    for path, why in [("/hostile/big.png", "too large"), ("/hostile/dir.png", "not a regular file (directory)"),
                      ("/hostile/gone.png", "missing")]:
        with pytest.raises(fs.UnusableInput) as caught:
            fs.read_input(mem, path, max_bytes=50)
        assert caught.value.why == why and path in str(caught.value)
    mem.rm("/hostile", recursive=True)
