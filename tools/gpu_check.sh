#!/usr/bin/env bash
# Everything GPU-side in one call (for a session lent a GPU through the device tool): the
# triton scan tests on the GPU, FSDP training steps of DiS-H/2 and DiS-B/2 (bf16, activation
# checkpointing) beside the planner's estimate, meta-device init and memory-bounded sampling of
# DiS-H/2, tools/sample.py, the scan backends against each other, bf16 numerics against
# float64, and context parallelism on the GPU. Most important first; each step has its own time
# limit, so one that hangs costs its limit and no more, and the summary at the end lists every
# step's exit status and seconds (124: over its limit).
#   bash tools/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.txt"
# Needs webdataset and braceexpand besides the machine's PyTorch (carry their wheels).
set -u
PYTHONPATH="${PYTHONPATH:-}:$PWD"
export PYTHONPATH PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
SUMMARY=()
step() {  # step NAME LIMIT_S CMD...: run CMD under LIMIT_S, note its exit status and time
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo; echo "=== $name (limit ${limit} s)"
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== $name: rc $rc in $((SECONDS - t0)) s"
    SUMMARY+=("$(printf '%-28s rc %3d %5d s' "$name" "$rc" "$((SECONDS - t0))")")
    return $rc
}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
step "environment" 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')"
step "triton scan tests" 120 "$PY" -m pytest -q tests/test_scan_backends.py -p no:cacheprovider \
    -k "triton and (matches_reference_fp32 or variants or bf16_inputs)"
step "train DiS-H/2 fsdp ckpt" 120 "$PY" tools/bench_train.py --model DiS-H/2 --strategy fsdp --micro-batch 16 --ckpt 1 --steps 5

# Meta-device init and memory-bounded sampling on the GPU: DiS-H/2 under FSDP (one rank), one
# step, then an 80-image guided grid in planned micro-batches; peak memory of each phase.
cat >"$WORK/grid.py" <<'PY'
import sys, time, torch
from dis_dist.config import load_config
from dis_dist.data.shards import write_random_cache
from dis_dist.train.trainer import Trainer

if __name__ == "__main__":  # the loader's spawned workers import this file
    out = sys.argv[1]
    write_random_cache(f"{out}/data", shards=2, per_shard=16, channels=4, size=32, classes=1000)
    cfg = load_config(None, [f"run_dir={out}/run", "data.source=shards", f"data.url={out}/data", "model.name=DiS-H/2",
                             "train.steps=1", "train.global_batch=8", "train.micro_batch=8", "train.precision=bf16",
                             "train.activation_checkpointing=1", "dist.strategy=fsdp", "sample.every=0",
                             "sample.num=80", "sample.cfg_scale=4.0", "sample.steps=ddim5", "sample.sampler=ddim",
                             "checkpoint.every=0"])
    t = time.perf_counter(); trainer = Trainer(cfg); torch.cuda.synchronize()
    print(f"init (meta-device, fsdp): {time.perf_counter() - t:.1f} s, {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    trainer.fit(resume="none", stop_at_step=1)
    print(f"one step: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; sampling batch {trainer.sample_batch}")
    torch.cuda.reset_peak_memory_stats(); t = time.perf_counter()
    grid = trainer.sample_grid(); torch.cuda.synchronize()
    print(f"80-image guided grid: {time.perf_counter() - t:.1f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
          f"grid {grid.shape}")
PY
step "DiS-H/2 init, step, grid" 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$WORK/grid.py" "$WORK/grid"

# Sampling and evaluation on the GPU: tools/sample.py (bf16) on an untrained DiS-S/2 in pixel
# space, then the Inception network's throughput (random weights: speed only).
cat >"$WORK/sample_setup.py" <<'PY'
import json, sys, time
import torch
from safetensors.torch import save_file
from dis_dist.eval.inception import load_inception
from dis_dist.models import build_model
from dis_dist.train.export import BUILD_KEYS
out = sys.argv[1]
info = {"name": "DiS-S/2", "input_size": 32, "in_channels": 3, "num_classes": 10, "learn_sigma": True,
        "vae": "pixels", "scaling_factor": 1.0, "class_names": [str(i) for i in range(10)]}
save_file(build_model(**{k: info[k] for k in BUILD_KEYS}).state_dict(), f"{out}/model.safetensors")
json.dump(info, open(f"{out}/config.json", "w"))
net = load_inception(None, "cuda")
x = torch.randint(0, 256, (250, 256, 256, 3), dtype=torch.uint8, device="cuda")
net(x); torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(4):
    net(x)
torch.cuda.synchronize()
print(f"inception features: {1000 / (time.perf_counter() - t):.0f} images/s (fp32, 256 px inputs)")
PY
mkdir -p "$WORK/sample"
step "inception throughput" 90 "$PY" "$WORK/sample_setup.py" "$WORK/sample"
step "tools/sample.py 512" 90 "$PY" tools/sample.py "$WORK/sample" --out "$WORK/sample/samples" --num-samples 512 \
    --batch-size 256 --steps 50 --cfg-scale 1.5 --device cuda
"$PY" -c "import numpy as np, sys; z = np.load(sys.argv[1]); print('samples', z['arr_0'].shape, z['arr_0'].dtype)" \
    "$WORK/sample/samples/samples.npz"

step "bench_scan bf16" 200 "$PY" tools/bench_scan.py --device cuda --dtype bf16 --backends reference,chunked,triton \
    --shapes dis-s2,dis-h2-256,dis-h2-512 --repeats 3 --skip-reference-above 1100
step "train DiS-B/2 fsdp ckpt" 90 "$PY" tools/bench_train.py --model DiS-B/2 --strategy fsdp --micro-batch 32 --ckpt 1 --steps 10
step "train DiS-H/2 fsdp no ckpt" 90 "$PY" tools/bench_train.py --model DiS-H/2 --strategy fsdp --micro-batch 4 --ckpt 0 --steps 5
# bf16 numerics under CUDA autocast, single and FSDP (NCCL, one rank), against float64.
step "bf16 numerics" 90 "$PY" tools/bench_numerics.py --device cuda

# Context parallelism on the GPU: two ranks sharing it over gloo (NCCL refuses two ranks on one
# GPU), a DiS-S-shaped model (width 368, depth 4) at L = 1026 split over both against the unsplit
# model (outputs and every gradient, fp32, the GPU's scan backend, within 1e-5), with and without
# activation checkpointing. (2026-12-04: 2.6e-6 with, in 30 s; an fp64 chunked case at L 1026
# and an fp32 one at L 4098 did not finish in 150 s there.)
cat >"$WORK/cp.json" <<JSON
{"cases": [{"model": {"width": 368, "depth": 4, "input_size": 64}, "batch": 2, "dtype": "float32",
            "backend": "auto", "checkpointing": true, "splits": [2], "device": "cuda"},
           {"model": {"width": 368, "depth": 4, "input_size": 32}, "batch": 2, "dtype": "float32",
            "backend": "auto", "checkpointing": false, "splits": [2], "device": "cuda"}],
 "out": "$WORK/cp_errors.json"}
JSON
step "context parallel 2 ranks" 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 tests/cp_run.py "$WORK/cp.json" \
    && echo "context parallel on cuda, max relative errors (fp32, L 1026 with checkpointing, L 258 without; 2 ranks): $(cat "$WORK/cp_errors.json")"

echo; echo "=== summary (rc 124: over its limit)"
printf '%s\n' "${SUMMARY[@]}"
