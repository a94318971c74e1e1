"""Exports, checkpoints and sample parts as a hostile user would hand them over (issue 26, items
4 and 11): every bad ``config.json``/``model.json`` value, every kind of damaged safetensors
file, integer or non-finite weights and damaged sample parts end in one CheckpointError line
naming the file and the key (exit status 2 from tools/sample.py) before anything is allocated
or drawn; a damaged part is drawn again."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dis_dist.errors import CheckpointError
from dis_dist.models import build_model
from dis_dist.sample import main as sample_main
from dis_dist.train.checkpoint import CheckpointManager
from dis_dist.train.export import export_checkpoint, load_model

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"name": "DiS-T/8", "input_size": 16, "in_channels": 1, "num_classes": 10, "learn_sigma": True}
INFO = {**SPEC, "vae": "pixels", "scaling_factor": 1.0, "class_names": [str(i) for i in range(10)],
        "diffusion": {"num_steps": 1000, "schedule": "linear"}}
HEADROOM = 2 << 30  # what a test may allocate beyond what the process has mapped already


@contextlib.contextmanager
def _memory_cap() -> Iterator[None]:
    """Cap this process's address space at what it maps now plus HEADROOM: an allocation of
    tens of GB fails at once (as MemoryError or torch's RuntimeError) instead of taking the
    machine down. The soft limit only, so it is lifted afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + HEADROOM, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _one_line(message: str, *parts: str) -> None:
    assert "\n" not in message.strip(), message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(**SPEC)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _write_export(directory: Path, state: dict[str, torch.Tensor], info: object = INFO) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(info if isinstance(info, str) else json.dumps(info))
    return directory


@pytest.fixture(scope="module")
def good_export(tmp_path_factory: pytest.TempPathFactory, weights: dict[str, torch.Tensor]) -> Path:
    return _write_export(tmp_path_factory.mktemp("export") / "good", weights)


def test_a_good_export_loads_its_weights(good_export: Path, weights: dict[str, torch.Tensor]) -> None:
    model, info = load_model(good_export)
    assert not model.training and info["diffusion"] == {"num_steps": 1000, "schedule": "linear"}
    state = model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


# -- config.json: types, ranges, missing keys, not JSON -------------------------------------------

_MISSING = object()
BAD_VALUES = [
    # key, value, what the message says about it
    ("name", 5, "name"), ("name", "DiS-Q/8", "name"), ("name", None, "name"),
    ("input_size", "16", "input_size"), ("input_size", 16.0, "input_size"), ("input_size", True, "input_size"),
    ("input_size", 0, "input_size"), ("input_size", -16, "input_size"), ("input_size", 12, "input_size"),
    ("input_size", 65536, "input_size"), ("input_size", 10**9, "input_size"),
    ("in_channels", None, "in_channels"), ("in_channels", 0, "in_channels"), ("in_channels", 10**9, "in_channels"),
    ("num_classes", 10.5, "num_classes"), ("num_classes", -1, "num_classes"), ("num_classes", 10**12, "num_classes"),
    ("learn_sigma", "yes", "learn_sigma"), ("learn_sigma", 1, "learn_sigma"),
    ("diffusion", "linear", "diffusion"), ("diffusion", {"num_steps": -1}, "num_steps"),
    ("diffusion", {"num_steps": "1000"}, "num_steps"), ("diffusion", {"schedule": "quadratic"}, "schedule"),
    ("scaling_factor", float("nan"), "scaling_factor"), ("scaling_factor", "0.18", "scaling_factor"),
    ("vae", 5, "vae"), ("class_names", "abc", "class_names"),
    *[(key, _MISSING, key) for key in SPEC],
]


@pytest.mark.parametrize(("key", "value", "named"), BAD_VALUES,
                         ids=[f"{k}={'missing' if v is _MISSING else repr(v)}" for k, v, _ in BAD_VALUES])
def test_bad_config_values_are_refused_before_building(
    tmp_path: Path, weights: dict[str, torch.Tensor], key: str, value: object, named: str
) -> None:
    info = {k: v for k, v in INFO.items() if k != key or value is not _MISSING}
    if value is not _MISSING:
        info[key] = value
    export = _write_export(tmp_path / "export", weights, info)
    with _memory_cap(), pytest.raises(CheckpointError) as caught:
        load_model(export)
    _one_line(str(caught.value), str(export / "config.json"), named)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", '"DiS-T/8"', "{" * 100_000])
def test_config_that_is_not_a_json_object_is_refused(
    tmp_path: Path, weights: dict[str, torch.Tensor], text: str
) -> None:
    export = _write_export(tmp_path / "export", weights, text)
    with pytest.raises(CheckpointError) as caught:
        load_model(export)
    _one_line(str(caught.value), str(export / "config.json"))


def test_sample_tool_refuses_a_34gb_export_without_allocating(tmp_path: Path, weights: dict) -> None:
    """input_size 65536 at patch 8: a 34 GB position embedding. The tool runs under a 4 GB
    address-space limit, so today's code cannot take the machine down trying."""
    export = _write_export(tmp_path / "export", weights, {**INFO, "input_size": 65536})
    out = tmp_path / "out"

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sample.py"), str(export), "--out", str(out), "--num-samples", "2",
         "--steps", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120, preexec_fn=cap,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    _one_line(errors[0], str(export / "config.json"), "input_size", "65536")
    assert not (out / "parts").exists()


def test_sample_tool_prints_one_line_for_a_bad_export(
    tmp_path: Path, weights: dict[str, torch.Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    export = _write_export(tmp_path / "export", weights, {**INFO, "num_classes": 10**12})
    out = tmp_path / "out"
    with _memory_cap():
        rc = sample_main([str(export), "--out", str(out), "--num-samples", "2", "--steps", "2"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    _one_line(err, "error:", str(export / "config.json"), "num_classes")
    assert not (out / "parts").exists()


# -- model.safetensors: damaged files, wrong tensors, integer and non-finite weights -----------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 16 + data[16:])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _resave(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(path))
        change(state)
        save_file(state, str(path))

    return damage


def _set(key: str, value: torch.Tensor | None) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(state: dict[str, torch.Tensor]) -> None:
        if value is None:
            del state[key]
        else:
            state[key] = value

    return change


def _all(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(state: dict[str, torch.Tensor]) -> None:
        state.update({k: f(v).contiguous() for k, v in state.items()})

    return change


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    # kind: (damage, what the message names)
    "truncated": (_truncate, "model.safetensors"),
    "garbage header": (_garbage_header, "model.safetensors"),
    "empty": (_empty, "model.safetensors"),
    "wrong shape": (_resave(_set("pos_embed", torch.zeros(1, 10, 128))), "pos_embed"),
    "missing tensor": (_resave(_set("final_layer.linear.weight", None)), "final_layer.linear.weight"),
    "extra tensor": (_resave(_set("extra.weight", torch.zeros(3))), "extra.weight"),
    "int32 weights": (_resave(_all(lambda v: (v * 100).to(torch.int32))), "int32"),
    "bool tensor": (_resave(_set("patch_embed.bias", torch.ones(128, dtype=torch.bool))), "patch_embed.bias"),
    "all-NaN weights": (_resave(_all(lambda v: torch.full_like(v, float("nan")))), "not finite"),
    "one inf": (_resave(_set("patch_embed.bias", torch.full((128,), float("inf")))), "patch_embed.bias"),
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_damaged_weights_are_refused(tmp_path: Path, good_export: Path, kind: str) -> None:
    export = tmp_path / "export"
    shutil.copytree(good_export, export)
    damage, named = DAMAGES[kind]
    damage(export / "model.safetensors")
    with _memory_cap(), pytest.raises(CheckpointError) as caught:
        load_model(export)
    _one_line(str(caught.value), str(export / "model.safetensors"), named)


def test_half_precision_weights_load(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    """A floating dtype other than the model's is converted, not refused."""
    export = _write_export(tmp_path / "export", {k: v.to(torch.bfloat16) for k, v in weights.items()})
    model, _ = load_model(export)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.state_dict()["pos_embed"], weights["pos_embed"].to(torch.bfloat16).float())


# -- a checkpoint's model.json and weights: the same checks -------------------------------------

def _write_checkpoint(root: Path, state: dict[str, torch.Tensor], info: object = INFO) -> Path:
    def write(directory: Path) -> None:
        torch.save({"model": state, "ema": state}, directory / "model.pt")
        (directory / "model.json").write_text(info if isinstance(info, str) else json.dumps(info))

    return CheckpointManager(root / "checkpoints", keep_last=2).save(10, write)


@pytest.mark.parametrize(("change", "named"), [
    ({"input_size": 65536}, "input_size"), ({"num_classes": True}, "num_classes"), ({"name": "DiT-XL/2"}, "name"),
    ({"learn_sigma": None}, "learn_sigma"), ("{not json", "model.json"),
], ids=["input_size=65536", "num_classes=True", "name=DiT-XL/2", "learn_sigma=None", "not json"])
def test_checkpoint_model_json_is_checked_by_export_and_sampling(
    tmp_path: Path, weights: dict[str, torch.Tensor], change: dict | str, named: str
) -> None:
    checkpoint = _write_checkpoint(tmp_path / "run", weights, change if isinstance(change, str) else {**INFO, **change})
    for load in (lambda: load_model(tmp_path / "run"), lambda: export_checkpoint(checkpoint, tmp_path / "out")):
        with _memory_cap(), pytest.raises(CheckpointError) as caught:
            load()
        _one_line(str(caught.value), str(checkpoint / "model.json"), named)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "named"), [
    (_set("pos_embed", torch.zeros(1, 10, 128)), "pos_embed"),
    (_set("final_layer.linear.weight", None), "final_layer.linear.weight"),
    (_all(lambda v: torch.full_like(v, float("nan"))), "not finite"),
    (_all(lambda v: v.to(torch.int32)), "int32"),
], ids=["wrong shape", "missing tensor", "all-NaN", "int32"])
def test_checkpoint_weights_are_checked_by_export_and_sampling(
    tmp_path: Path, weights: dict[str, torch.Tensor], change: Callable, named: str
) -> None:
    state = dict(weights)
    change(state)
    checkpoint = _write_checkpoint(tmp_path / "run", state)
    for load in (lambda: load_model(checkpoint), lambda: export_checkpoint(checkpoint, tmp_path / "out")):
        with pytest.raises(CheckpointError) as caught:
            load()
        _one_line(str(caught.value), str(checkpoint / "model.pt"), named)
    assert not (tmp_path / "out").exists()


def test_a_good_checkpoint_exports_and_loads(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    checkpoint = _write_checkpoint(tmp_path / "run", weights)
    export_checkpoint(checkpoint, tmp_path / "out")
    for source in (checkpoint, tmp_path / "out"):
        state = load_model(source)[0].state_dict()
        assert all(torch.equal(state[k], weights[k]) for k in weights)


# -- sample parts: a damaged one is drawn again -------------------------------------------------------

SAMPLE_ARGS = ["--num-samples", "10", "--batch-size", "4", "--steps", "2", "--seed", "3", "--grid", "0"]


@pytest.fixture(scope="module")
def undamaged_run(tmp_path_factory: pytest.TempPathFactory, good_export: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("samples") / "out"
    assert sample_main([str(good_export), "--out", str(out), *SAMPLE_ARGS]) == 0
    with np.load(out / "samples.npz") as z:
        return out, {k: z[k] for k in z.files}


def _wrong_arrays(path: Path) -> None:
    np.savez(path.with_name("x.npz"), images=np.zeros((2, 16, 16, 3), np.uint8), labels=np.zeros(2, np.int64))
    path.with_name("x.npz").replace(path)


PART_DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate, "empty": _empty, "garbage": lambda p: p.write_bytes(os.urandom(p.stat().st_size)),
    "wrong arrays": _wrong_arrays,
}


@pytest.mark.parametrize("kind", list(PART_DAMAGES))
def test_a_damaged_sample_part_is_drawn_again(
    tmp_path: Path, good_export: Path, undamaged_run: tuple[Path, dict], kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, expected = undamaged_run
    out = tmp_path / "out"
    shutil.copytree(first, out)
    (out / "samples.npz").unlink()
    parts = sorted((out / "parts").glob("*.npz"))
    assert len(parts) == 3
    PART_DAMAGES[kind](parts[1])
    kept = parts[0].stat().st_mtime_ns
    with caplog.at_level("WARNING", logger="dis_dist.sample"):
        assert sample_main([str(good_export), "--out", str(out), *SAMPLE_ARGS]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(parts[1].name in w for w in warnings), warnings
    assert parts[0].stat().st_mtime_ns == kept  # the undamaged parts are not drawn again
    with np.load(out / "samples.npz") as z:
        assert z.files == list(expected) and all(np.array_equal(z[k], expected[k]) for k in expected)


def test_a_damaged_sampling_json_is_one_line(tmp_path):
    from dis_dist.errors import DataError
    from dis_dist.sample import SETTINGS_FILE, _agreed_settings

    (tmp_path / SETTINGS_FILE).write_text('{"sampler": "ddim", ')  # cut off
    with pytest.raises(DataError, match="damaged"):
        _agreed_settings(tmp_path, {"sampler": "ddim"})
    (tmp_path / SETTINGS_FILE).write_text("[1, 2]")
    with pytest.raises(DataError, match="not a JSON object"):
        _agreed_settings(tmp_path, {"sampler": "ddim"})
