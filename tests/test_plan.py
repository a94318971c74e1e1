"""The memory planner: its activation model against measured autograd graphs, its arithmetic,
its recommendation and its command line. (Model-state estimates are checked against measured
per-rank storage of real 2-rank runs in tests/test_distributed.py.)"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from dis_dist.errors import ConfigError
from dis_dist.models import build_model
from dis_dist.plan import (
    ACT_BYTES,
    ACT_BYTES_CP_EXTRA,
    ACT_CKPT_BYTES,
    GB,
    choices,
    cp_buffer_bytes,
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
    # The planner models GPU runs: the chunked scan stands in for the GPU backends (it keeps what
    # they keep); the native CPU kernel keeps less (its inputs in place, fewer chunk boundaries).
    model = build_model(name, input_size=latent, in_channels=4, num_classes=1000, drop_path_rate=0.0,
                        scan_backend="chunked")
    tokens, blocks = model.num_patches + 2, model.depth + 1
    tolerance = 0.1 if precision == "fp32" else 0.2  # bf16 autocast keeps mixed copies
    measured = saved_activation_bytes(model, batch=1, precision=precision)
    assert measured == pytest.approx(ACT_BYTES[precision] * tokens * model.width * blocks, rel=tolerance)
    model.set_activation_checkpointing(1)
    measured = saved_activation_bytes(model, batch=1, precision=precision)
    assert measured == pytest.approx(ACT_CKPT_BYTES[precision] * tokens * model.width * blocks, rel=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("precision,latent", [("fp32", 64), ("bf16", 32)])
def test_context_parallel_extra_matches_measured_graph(tmp_path, latent, precision):
    """What a context-parallel rank's mixer keeps beyond the unsplit one's (the steps its log-decays
    and corrections recompute from, the exchanged states): ACT_BYTES_CP_EXTRA and cp_buffer_bytes,
    measured in a group of one rank, whose slice is the whole sequence."""
    model = build_model("DiS-S/2", input_size=latent, in_channels=4, num_classes=1000, drop_path_rate=0.0,
                        scan_backend="chunked")  # as the GPU backends (see above)
    tokens, blocks = model.num_patches + 2, model.depth + 1
    plain = saved_activation_bytes(model, batch=1, precision=precision)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model.set_context_parallel(dist.new_group([0]))
        split = saved_activation_bytes(model, batch=1, precision=precision)
    finally:
        if started:
            dist.destroy_process_group()
    expected = (ACT_BYTES_CP_EXTRA[precision] * tokens * model.width + cp_buffer_bytes(model.width, 1)) * blocks
    assert split - plain == pytest.approx(expected, rel=0.2)


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


def test_context_parallel_activations_and_states():
    """DiS-H/2 at 1024 px (4098 tokens): a GPU of a context-parallel group of k keeps about 1/k of a
    sample's activations, plus the correction scan's and, per block, the gathered scan states and
    conv halo; model states are those without it."""
    by_k = {k: {e.setting.name: e for e in estimate("DiS-H/2", latent=128, gpus=64, context_parallel=k)}
            for k in (1, 2, 4, 8)}
    one = by_k[1]["fsdp"]
    d_inner, blocks = 2 * 1536, 49
    for k in (2, 4, 8):
        est = by_k[k]["fsdp"]
        local = -(-4098 // k)
        buffers = 2 * k * 2 * 2 * d_inner * 16 * 4 + k * 2 * d_inner * 3 * 4
        assert cp_buffer_bytes(1536, k) == buffers
        assert est.act_block == pytest.approx((ACT_BYTES["bf16"] + ACT_BYTES_CP_EXTRA["bf16"]) * local * 1536 + buffers)
        assert est.act_per_sample == pytest.approx(blocks * est.act_block)
        assert 1.0 < est.act_per_sample * k / one.act_per_sample < 1.2
        assert est.act_per_sample_ckpt * k / one.act_per_sample_ckpt == pytest.approx(1.0, abs=0.01)
        assert est.states == one.states and est.transient == one.transient  # sharded over all 64 GPUs
        assert not {"zero1", "zero2", "zero3"} & set(by_k[k])  # DeepSpeed has no context parallelism
    assert set(by_k[1]) >= {"zero1", "zero2", "zero3"}


def test_context_parallel_recommendation_and_cli(capsys):
    """DiS-H/2 at 1024 px on 64 GPUs, global batch 256: without context parallelism a micro-batch of
    one fits 80 GB without checkpointing (the per-GPU batch of 4 does not), so the planner keeps
    k = 1; on 40 GB only checkpointing or context parallelism fits, and k = 2 wins."""
    per_gpu = {k: 256 // (64 // k) for k in (1, 4)}
    fits = {k: {(c.estimate.setting.name, c.checkpointing): c.micro_batch for c in reversed(
        choices(estimate("DiS-H/2", latent=128, gpus=64, context_parallel=k), per_gpu[k], 80))} for k in (1, 4)}
    assert fits[1][("fsdp", False)] == 1 and fits[4][("fsdp", False)] == 4
    assert main(["--resolution", "1024", "--gpus", "64", "--global-batch", "256", "--context-parallel", "4"]) == 0
    out = capsys.readouterr().out
    assert "(16 per GPU), context parallel 4 (1025 of 4098 tokens per GPU)" in out
    assert "dist.context_parallel=4" in out and "zero_stage" not in out and "\nzero2 " not in out
    auto = table("DiS-H/2", 1024, 64, 80, 256, context_parallel=0)
    assert auto.count("-" * 104) == 4 and "recommended (over context parallel 1, 2, 4, 8)" in auto
    assert "dist.context_parallel" not in auto.split("recommended")[1]
    auto = table("DiS-H/2", 1024, 64, 40, 256, context_parallel=0)
    assert "dist.strategy=fsdp" in auto and "dist.context_parallel=2" in auto.split("recommended")[1]
    with pytest.raises(ConfigError, match="--gpus 64 is not divisible by --context-parallel 3"):
        table("DiS-H/2", 1024, 64, 80, 256, context_parallel=3)
    assert main(["--gpus", "64", "--context-parallel", "3"]) == 2
    assert "error: --gpus 64 is not divisible by --context-parallel 3" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not divisible by --gpus 64 / --context-parallel 8 = 8"):
        table("DiS-H/2", 1024, 64, 80, 4, context_parallel=8)


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
