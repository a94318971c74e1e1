"""tools/profile_step.py: kernel and op names fall into the right families, a GPU profile's
kernels are attributed through the ops and ranges that launched them (busy is their union, not
their sum), and a real CPU profile of a tiny DiS accounts for every microsecond once."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import profile

from tools import profile_step
from tools.profile_step import FAMILIES, STEP_RANGE, attribute, classify, collect, report, step_windows, summarize


@pytest.mark.parametrize(("name", "family"), [
    # GPU kernels
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off",
     "GEMM"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn", "GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>(...)", "GEMM"),
    ("_scan_fwd_kernel", "scan"),
    ("_scan_bwd_kernel", "scan"),
    ("void selective_scan_fwd_kernel<Selective_Scan_fwd_kernel_traits<32, 4, 1, true, true, true, false, "
     "false, c10::BFloat16, float, float> >(SSMParamsBase)", "scan"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
     "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>)",
     "norm/element-wise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float> > >",
     "norm/element-wise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, ...)",
     "norm/element-wise"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "FSDP/comm"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "FSDP/comm"),
    ("Memcpy DtoD (Device -> Device)", "FSDP/comm"),
    ("void at::native::(anonymous namespace)::chunk_cat_cuda_kernel<float, float>(...)", "FSDP/comm"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, ...>", "optimizer+EMA"),
    ("void at::native::conv_depthwise2d_forward_kernel<1, float, int>(...)", "conv"),
    ("sm80_xmma_fprop_implicit_gemm_indexed_wo_smem_f32f32_tf32f32_f32_nhwckrsc_nhwc", "conv"),
    # CPU ops, autograd nodes and ranges
    ("aten::addmm", "GEMM"),
    ("aten::mm", "GEMM"),
    ("autograd::engine::evaluate_function: MmBackward0", "GEMM"),
    ("aten::conv1d", "conv"),
    ("aten::convolution_backward", "conv"),
    ("_CpuConvBackward", "conv"),
    ("_CpuScan", "scan"),
    ("_ChunkedScanBackward", "scan"),
    ("_TritonScan", "scan"),
    ("aten::_foreach_lerp_", "optimizer+EMA"),
    ("Optimizer.step#AdamW.step", "optimizer+EMA"),
    ("ema", "optimizer+EMA"),
    ("aten::mul_", "norm/element-wise"),
    ("aten::softplus", "norm/element-wise"),
    ("aten::native_layer_norm", "norm/element-wise"),
    ("c10d::allreduce_", "FSDP/comm"),
    ("FSDP::all_gather_copy_in", "FSDP/comm"),
    ("nccl:_reduce_scatter_base", "FSDP/comm"),
    # names that only look like a family
    ("aten::broadcast_tensors", "other"),
    ("nccl:broadcast", "FSDP/comm"),
    ("aten::expand", "other"),
    ("aten::view", "other"),
    ("forward+backward", "other"),
])
def test_classify(name, family):
    assert family in FAMILIES
    assert classify(name) == family


def test_attribute_follows_owning_ranges():
    # an element-wise op inside a scan backend's autograd function is scan time
    assert attribute(["forward+backward", "_ChunkedScan", "aten::mul"]) == "scan"
    # anything under the optimizer or EMA range is optimizer+EMA, even a matmul-looking name
    assert attribute(["optimizer", "aten::linalg_vector_norm"]) == "optimizer+EMA"
    assert attribute(["ema", "aten::_foreach_lerp_"]) == "optimizer+EMA"
    # a copy inside FSDP's all-gather is communication; outside it, element-wise
    assert attribute(["FSDP::all_gather_copy_out", "aten::copy_"]) == "FSDP/comm"
    assert attribute(["forward+backward", "aten::to", "aten::copy_"]) == "norm/element-wise"
    # a kernel whose name says nothing takes its launching op's family
    assert attribute(["forward+backward", "aten::mm", "nvjet_tst_64x8_64x16_4x1_v_bz_TNN"]) == "GEMM"
    assert attribute(["forward+backward", "aten::linear", "aten::t"]) == "GEMM"
    assert attribute(["forward+backward", "aten::view"]) == "other"
    assert attribute([]) == "other"


def _event(eid: int, name: str, start: float, end: float, parent: FunctionEvent | None = None, *, device: bool = False,
           linked: int = 0, annotation: bool = False, activity: str | None = None) -> FunctionEvent:
    e = FunctionEvent(id=eid, name=name, thread=1, start_us=start, end_us=end, is_user_annotation=annotation,
                      device_type=DeviceType.CUDA if device else DeviceType.CPU, linked_correlation_id=linked,
                      activity_type=activity or ("kernel" if device else "user_annotation" if annotation else "cpu_op"))
    if parent is not None:
        e.set_cpu_parent(parent)
        parent.append_cpu_child(e)
    return e


def gpu_profile(linked: bool) -> tuple[list[FunctionEvent], dict[int, int]]:
    """Two steps of a made-up GPU profile: CPU ranges and ops, and the kernels they launched, linked
    to their ops by the events themselves (``linked``) or by the raw results' map."""
    events, links = [], {}
    for i, t0 in enumerate((0.0, 1000.0)):
        base = 100 * (i + 1)
        step = _event(base, f"{STEP_RANGE}{i}", t0, t0 + 800, annotation=True)
        fb = _event(base + 1, "forward+backward", t0, t0 + 500, step, annotation=True)
        mm = _event(base + 2, "aten::mm", t0 + 10, t0 + 20, fb)
        mul = _event(base + 3, "aten::mul", t0 + 20, t0 + 30, fb)
        scan = _event(base + 4, "_ChunkedScan", t0 + 30, t0 + 50, fb)
        scan_mul = _event(base + 5, "aten::mul", t0 + 31, t0 + 40, scan)
        reduce = _event(base + 6, "nccl:_reduce_scatter_base", t0 + 60, t0 + 70, fb)
        copy = _event(base + 7, "aten::copy_", t0 + 70, t0 + 80, fb)
        opt = _event(base + 8, "optimizer", t0 + 500, t0 + 700, step, annotation=True)
        foreach = _event(base + 9, "aten::_foreach_mul_", t0 + 510, t0 + 520, opt)
        events += [step, fb, mm, mul, scan, scan_mul, reduce, copy, opt, foreach]
        kernels = [
            (mm, "nvjet_tst_64x8_64x16_4x1_v_bz_TNN", 100, 300, "kernel"),
            (mul, "void at::native::vectorized_elementwise_kernel<4, MulFunctor>", 300, 350, "kernel"),
            (scan_mul, "void at::native::vectorized_elementwise_kernel<4, MulFunctor>", 350, 400, "kernel"),
            # on the communication stream, overlapping the GEMM: summed in the families, once in busy
            (reduce, "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", 200, 400, "kernel"),
            (copy, "Memcpy DtoD (Device -> Device)", 400, 420, "gpu_memcpy"),
            (foreach, "multi_tensor_apply_kernel", 600, 640, "kernel"),
            # the GPU's copy of a CPU range: not work
            (None, "optimizer", 600, 700, "gpu_user_annotation"),
        ]
        for k, (op, name, start, end, activity) in enumerate(kernels):
            eid = 10 * base + k
            op_id = op.id if op is not None else 0
            events.append(_event(eid, name, t0 + start, t0 + end, device=True, linked=op_id if linked else 0,
                                 activity=activity))
            links[eid] = op_id
    return events, links


@pytest.mark.parametrize("linked", [True, False], ids=["linked events", "raw links"])
def test_gpu_profile_is_attributed_through_launching_ops(linked):
    events, links = gpu_profile(linked)
    work = collect(events, on_gpu=True, links=None if linked else links)
    assert len(work) == 12  # 6 per step; the annotation left out
    summary = summarize(work, step_windows(events), on_gpu=True, top=3)
    per_step = {f: t / 2 for f, t in summary.families_us.items()}
    assert per_step == {"GEMM": 200, "scan": 50, "conv": 0, "norm/element-wise": 50, "optimizer+EMA": 40,
                        "FSDP/comm": 220, "other": 0}
    for s in summary.steps:
        assert s.wall_us == 800
        assert s.busy_us == 360  # [100, 420] and [600, 640]: the overlap once
        assert s.launches == 5  # kernels, not the memory copy
    assert summary.top[0] == ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", 2, 400)
    assert summary.top[1] == ("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", 2, 400)
    assert summary.top[2] == ("void at::native::vectorized_elementwise_kernel<4, MulFunctor>", 4, 200)
    out = summary.to_json()
    assert out["busy_ms"] == 0.36 and out["wall_ms"] == 0.8 and out["launches"] == 5
    assert out["total_ms"] == pytest.approx(sum(out["families_ms"].values())) == 0.56
    text = report(summary)
    assert "union of GPU kernel" in text and "top 3 kernels" in text


def test_gpu_kernels_without_their_op_fall_back_to_their_names():
    events, _ = gpu_profile(linked=False)
    summary = summarize(collect(events, on_gpu=True), step_windows(events), on_gpu=True)
    per_step = {f: t / 2 for f, t in summary.families_us.items()}
    # the nameless GEMM kernel stays GEMM by its own name; the scan's element-wise kernel does not
    assert per_step["GEMM"] == 200 and per_step["scan"] == 0 and per_step["norm/element-wise"] == 100


def _report_families(text: str) -> dict[str, float]:
    block = text[text.index("time by family"):text.index("top ")]
    return {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^  (\S.*?)\s+(-?[\d.]+)\s", block, re.M)}


def test_cpu_profile_of_a_tiny_dis(tmp_path, capsys):
    trace, summary = tmp_path / "trace.json", tmp_path / "summary.json"
    rc = profile_step.main([
        "--model", "DiS-T/8", "--latent", "16", "--strategy", "single", "--precision", "fp32",
        "--micro-batch", "2", "--warmup", "1", "--steps", "2", "--trace", str(trace), "--json", str(summary),
    ])
    assert rc == 0
    text = capsys.readouterr().out

    out = json.loads(summary.read_text())
    assert out["device"] == "cpu" and out["steps"] == 2 and out["model"] == "DiS-T/8"
    families = out["families_ms"]
    assert list(families) == list(FAMILIES)
    assert all(t >= 0 for t in families.values())
    assert sum(families.values()) == pytest.approx(out["total_ms"], abs=0.01)
    for family in ("GEMM", "scan", "optimizer+EMA", "norm/element-wise", "conv"):
        assert families[family] > 0, family
    assert families["FSDP/comm"] == 0  # one process, no strategy that communicates
    assert out["launches"] > 0
    # CPU self times on one thread: every microsecond of the step once, nothing nested twice
    assert out["total_ms"] == pytest.approx(out["wall_ms"], rel=0.02)
    assert 0 < out["busy_ms"] <= out["wall_ms"]

    printed = _report_families(text)
    assert set(FAMILIES) | {"total"} <= set(printed)
    assert sum(printed[f] for f in FAMILIES) == pytest.approx(printed["total"], abs=0.1 * len(FAMILIES))
    assert printed["total"] == pytest.approx(out["total_ms"], abs=0.06)
    top = text[text.index("top 15 ops"):].splitlines()[2:]
    rows = [line for line in top if re.search(r"\s\d+\s+[\d.]+\s+[\d.]+%$", line)]
    assert len(rows) == 15
    assert any("aten::mm" in line or "aten::addmm" in line for line in rows)

    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"forward+backward", "optimizer", "ema", f"{STEP_RANGE}0", f"{STEP_RANGE}1"} <= names


def test_device_links_reads_this_pytorch_results():
    with profile() as prof:
        torch.ones(4, 4) @ torch.ones(4, 4)
    assert profile_step.device_links(prof) == {}  # a CPU profile launches nothing on a device


@pytest.mark.parametrize(("flags", "message"), [
    (["--model", "DiS-Q/3"], "unknown model 'DiS-Q/3'"),
    (["--scan-backend", "fastest"], "unknown selective-scan backend 'fastest'"),
])
def test_user_errors_are_one_line(flags, message, capsys):
    assert profile_step.main(["--model", "DiS-T/8", "--latent", "16", "--strategy", "single", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
