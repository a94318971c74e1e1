"""The memory planner: its activation model against measured autograd graphs, its arithmetic,
its recommendation and its command line. (Model-state estimates are checked against measured
per-rank storage of real 2-rank runs in tests/test_distributed.py.)"""

from __future__ import annotations

import pytest

from dis_dist.errors import ConfigError
from dis_dist.models import build_model
from dis_dist.plan import (
    ACT_BYTES,
    ACT_CKPT_BYTES,
    GB,
    choices,
    estimate,
    inference_bytes_per_image,
    main,
    peak_inference_bytes,
    sample_batch_size,
    saved_activation_bytes,
    table,
)


@pytest.mark.slow
@pytest.mark.parametrize("name,latent", [("DiS-S/2", 32), ("DiS-S/4", 64), ("DiS-S/2", 64), ("DiS-B/2", 32)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_model_matches_measured_graph(name, latent, precision):
    model = build_model(name, input_size=latent, in_channels=4, num_classes=1000, drop_path_rate=0.0)
    tokens, blocks = model.num_patches + 2, model.depth + 1
    tolerance = 0.1 if precision == "fp32" else 0.2  # bf16 autocast keeps mixed copies
    measured = saved_activation_bytes(model, batch=1, precision=precision)
    assert measured == pytest.approx(ACT_BYTES[precision] * tokens * model.width * blocks, rel=tolerance)
    model.set_activation_checkpointing(1)
    measured = saved_activation_bytes(model, batch=1, precision=precision)
    assert measured == pytest.approx(ACT_CKPT_BYTES[precision] * tokens * model.width * blocks, rel=tolerance)


def test_sharding_arithmetic():
    by_name = {e.setting.name: e for e in estimate("DiS-H/2", latent=32, gpus=64, precision="bf16")}
    params = 906_966_560
    assert by_name["ddp"].states == pytest.approx(20 * params)
    assert by_name["fsdp"].states == pytest.approx(20 * params / 64)
    assert by_name["hsdp"].states == pytest.approx(20 * params / 8)  # sharded over a node's 8 GPUs
    # DeepSpeed's bf16 is autocast over fp32 weights: fp32 weights and gradients.
    assert by_name["zero1"].states == pytest.approx(8 * params + 16 * params / 64)
    assert by_name["zero2"].states == pytest.approx(4 * params + 20 * params / 64)
    assert by_name["zero3"].states == pytest.approx(20 * params / 64)  # its weights are the master
    # More GPUs never need more memory per GPU; checkpointing always needs less.
    wide = {e.setting.name: e for e in estimate("DiS-H/2", latent=32, gpus=256, precision="bf16")}
    for name, est in by_name.items():
        assert wide[name].total(8, False) <= est.total(8, False)
        assert est.total(8, True) < est.total(8, False)


def test_recommendation_fits_and_prefers_no_checkpointing_when_possible():
    ests = estimate("DiS-B/2", latent=32, gpus=8, precision="bf16")
    ranked = choices(ests, per_gpu_batch=32, gpu_mem_gb=80)
    assert ranked and all(c.memory <= 80 * GB for c in ranked)
    assert not ranked[0].checkpointing and ranked[0].micro_batch * ranked[0].accumulation == 32
    tight = choices(estimate("DiS-H/2", latent=64, gpus=8, precision="bf16"), per_gpu_batch=32, gpu_mem_gb=40)
    assert tight and all(c.memory <= 40 * GB for c in tight)
    assert not choices(estimate("DiS-H/2", latent=64, gpus=1, precision="bf16"), per_gpu_batch=32, gpu_mem_gb=16)


def test_table_and_cli(capsys):
    text = table("DiS-H/2", 256, 64, 80, 1024)
    assert "recommended:" in text and "dist.strategy=" in text and "zero3" in text
    assert main(["--model", "DiS-H/2", "--resolution", "512", "--gpus", "8", "--global-batch", "256"]) == 0
    assert "64x64x4 latents" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not divisible by --gpus"):
        table("DiS-H/2", 256, 64, 80, 1000)
    assert main(["--resolution", "250"]) == 2


@pytest.mark.parametrize("name,latent", [("DiS-T/8", 32), ("DiS-S/2", 32), ("DiS-S/4", 64)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_model_matches_measured_peak(name, latent, precision):
    """The sampling micro-batch rests on INFER_BYTES: the measured peak of a no-grad forward
    grows by that much per image."""
    model = build_model(name, input_size=latent, in_channels=4, num_classes=1000, scan_backend="chunked").eval()
    per_image = peak_inference_bytes(model, 2, precision) - peak_inference_bytes(model, 1, precision)
    assert per_image == pytest.approx(inference_bytes_per_image(name, latent=latent, precision=precision), rel=0.2)


def test_sample_batch_size_fits_the_free_memory():
    kwargs = dict(latent=32, channels=4, num_classes=1000, precision="fp32")
    per_image = inference_bytes_per_image("DiS-H/2", latent=32, precision="fp32")
    batch = sample_batch_size("DiS-H/2", guidance=True, free_bytes=8 * GB, **kwargs)
    assert batch == int(0.5 * 8 * GB / (2 * per_image)) and 2 * batch * per_image <= 4 * GB
    assert sample_batch_size("DiS-H/2", guidance=False, free_bytes=8 * GB, **kwargs) in (2 * batch, 2 * batch + 1)
    assert sample_batch_size("DiS-H/2", guidance=True, free_bytes=0, **kwargs) == 1  # never below one
    assert sample_batch_size("DiS-T/8", guidance=True, free_bytes=1e12, **kwargs) == 256  # nor above the cap
