#!/usr/bin/env bash
# Everything GPU-side in one call of under 8 minutes, most important first (for a session lent a
# GPU through the device tool; carry .gpu_deps, made here by `bash tools/gpu_deps.sh`):
#   1. mamba-ssm's selective_scan_cuda built from its sdist (in the background while 2 runs);
#   2. the triton_tiled scan's tests on the GPU;
#   3. the scan: every backend against the float64 reference, then the table at DiS-H/2's shapes
#      (b 16, d 3072, L 258 and 1026, bf16): triton_tiled, triton, mamba-ssm once (cuda-x1) and
#      as the official DiS calls it (cuda: two calls and the flips), with the memory floor;
#   4. training steps, FSDP bf16: DiS-H/2 at the first check's setting with the old and the new
#      scan, then DiS-H/2 and DiS-B/2 at micro-batch 16/32/64 with and without checkpointing
#      (MFU, peak memory beside the planner's estimate);
#   5. the step's profile (GPU busy vs wall, time by family) before (triton) and after (triton_tiled);
#   6. DeepSpeed ZeRO-2 for one step; 7. encode images/s with the SD-VAE architecture (random
#      weights, bf16, 256 px); then, time permitting, bf16 numerics and context parallelism.
# Each step runs under its own time limit, and none starts once the budget (BUDGET_S, 450 s) is
# spent; a summary lists every step's exit status and seconds (124: over its limit).
#   device run: bash tools/gpu_check.sh "$OUT"     (carry: .gpu_deps; timeout_s 540)
set -u
OUTDIR=${1:-gpu_check_out}
DEPS=${GPU_DEPS:-.gpu_deps}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.txt") 2>&1
PYTHONPATH="${PYTHONPATH:-}:$PWD"
export PYTHONPATH PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY=()
step() {  # step NAME LIMIT_S CMD...: run CMD under LIMIT_S unless the budget is spent
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    if (( SECONDS + 10 > BUDGET_S )); then
        SUMMARY+=("$(printf '%-34s skipped (budget of %d s spent)' "$name" "$BUDGET_S")")
        return 125
    fi
    echo; echo "=== $name (limit ${limit} s, at ${SECONDS} s)"
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== $name: rc $rc in $((SECONDS - t0)) s"
    SUMMARY+=("$(printf '%-34s rc %3d %5d s' "$name" "$rc" "$((SECONDS - t0))")")
    return $rc
}

step "environment" 30 "$PY" -c "import torch, triton; p = torch.cuda.get_device_properties(0); print('torch',
torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, p.name, p.multi_processor_count, 'SMs',
f'{p.total_memory / 2**30:.0f} GiB')"
step "install carried wheels" 90 "$PY" -m pip install -q --no-index --find-links "$DEPS" webdataset deepspeed diffusers

# 1. The mamba-ssm build runs beside the tests (they need little CPU).
MAMBA_EXT="$WORK/mamba_ext"
(timeout -k 10 300 "$PY" tools/build_mamba_scan.py "$DEPS" --out "$MAMBA_EXT" >"$OUTDIR/mamba_build.txt" 2>&1;
 echo "exit status $?" >>"$OUTDIR/mamba_build.txt") &
BUILD_PID=$!

# 2. The tiled scan on the GPU: the mixer's layouts (fp32, bf16), one tile shape that divides
# nothing, the states of one direction, against the float64 reference on the CPU.
step "triton_tiled tests" 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_scan_tiled.py tests/test_scan_backends.py \
    -k "mixer_layouts or (tile_shapes and 8-16) or (triton_tiled and (bf16_inputs or fp32 or bidirectional))" \
    -m "not slow"

t0=$SECONDS; wait "$BUILD_PID"
echo; echo "=== mamba-ssm build (waited $((SECONDS - t0)) s):"; tail -5 "$OUTDIR/mamba_build.txt"
SUMMARY+=("$(printf '%-34s %s' "mamba-ssm build" "$(tail -1 "$OUTDIR/mamba_build.txt")")")
export DIS_MAMBA_SCAN_EXT="$MAMBA_EXT"
SCANS=triton_tiled,triton
"$PY" -c "import torch; from dis_dist.ops.selective_scan import available_backends as a; import sys;
sys.exit('cuda' not in a(torch.device('cuda')))" && SCANS=triton_tiled,triton,cuda-x1,cuda

# 3. The scan table.
step "scan check + table (bf16)" 150 "$PY" tools/bench_scan.py --device cuda --dtype bf16 --bidirectional \
    --check 2x512x258 --shapes dis-h2-256-b16,dis-h2-512-b16 --backends "$SCANS" --repeats 5

# 4. Training steps (FSDP on one GPU, bf16).
step "DiS-H/2 mb16 ckpt: old vs new scan" 90 "$PY" tools/bench_train.py --model DiS-H/2 --strategy fsdp \
    --micro-batch 16 --ckpt 1 --steps 5 --scan-backends triton,triton_tiled
step "DiS-H/2 sweep (triton_tiled)" 120 "$PY" tools/bench_train.py --model DiS-H/2 --strategy fsdp \
    --micro-batches 32,64 --ckpts 1,0 --steps 4 --warmup 2 --scan-backends triton_tiled
step "DiS-B/2 sweep (triton_tiled)" 90 "$PY" tools/bench_train.py --model DiS-B/2 --strategy fsdp \
    --micro-batches 16,32,64 --ckpts 1,0 --steps 5 --warmup 2 --scan-backends triton_tiled

# 5. Where the step's time goes, before and after.
for scan in triton triton_tiled; do
    step "profile DiS-H/2 mb16 ($scan)" 60 "$PY" tools/profile_step.py --model DiS-H/2 --strategy fsdp --micro-batch 16 \
        --ckpt 1 --scan-backend "$scan" --steps 2 --warmup 2 --json "$OUTDIR/profile_$scan.json"
done

# 6. DeepSpeed ZeRO-2, one step.
step "DeepSpeed ZeRO-2 DiS-B/2" 90 "$PY" tools/bench_train.py --model DiS-B/2 --strategy deepspeed --zero-stage 2 \
    --micro-batch 32 --steps 1 --warmup 1 --scan-backends triton_tiled

# 7. Encoding with the SD-VAE architecture (random weights): 512 random 288 px JPEGs cropped to
# 256, bf16; the rate counts the whole command (start-up, decoding, flips).
cat >"$WORK/vae_setup.py" <<'PY'
import sys
from pathlib import Path
import numpy as np
from diffusers import AutoencoderKL
from PIL import Image
root = Path(sys.argv[1])
AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, sample_size=256).save_pretrained(root / "vae")
rng = np.random.default_rng(0)
for i in range(512):
    folder = root / "images" / f"c{i % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (288, 288, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
PY
cat >"$WORK/encode.sh" <<SH
set -e
"$PY" "$WORK/vae_setup.py" "$WORK/enc"
t0=\$(date +%s.%N)
"$PY" tools/encode_latents.py --input "$WORK/enc/images" --output "$WORK/enc/cache" --vae "$WORK/enc/vae" \\
    --resolution 256 --device cuda --precision bf16 --batch-size 64 --no-progress
"$PY" -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'encode: 512 images (and flips) in {s:.1f} s: {512 / s:.0f} images/s, start-up included')" "\$t0" "\$(date +%s.%N)"
SH
step "encode SD-VAE (random weights)" 90 bash "$WORK/encode.sh"

# Time permitting: bf16 numerics and context parallelism, as in the first check.
step "bf16 numerics" 60 "$PY" tools/bench_numerics.py --device cuda
cat >"$WORK/cp.json" <<JSON
{"cases": [{"model": {"width": 368, "depth": 4, "input_size": 32}, "batch": 2, "dtype": "float32",
            "backend": "triton_tiled", "checkpointing": false, "splits": [2], "device": "cuda"}],
 "out": "$WORK/cp_errors.json"}
JSON
step "context parallel (triton_tiled)" 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
    tests/cp_run.py "$WORK/cp.json" && echo "context parallel, max relative error: $(cat "$WORK/cp_errors.json")"

echo; echo "=== summary (rc 124: over its limit; $SECONDS s in all)"
printf '%s\n' "${SUMMARY[@]}"
