#!/usr/bin/env bash
# Everything GPU-side in one call (for a session lent a GPU through the device tool):
# the scan backends against each other, the triton tests on the GPU, bf16 numerics against
# float64, and FSDP training steps of
# DiS-B/2 and DiS-H/2 (bf16, activation checkpointing) beside the planner's estimate.
#   bash tools/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.txt"
set -u
PYTHONPATH="${PYTHONPATH:-}:$PWD"
export PYTHONPATH
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python tools/bench_scan.py --device cuda --dtype bf16 --backends reference,chunked,triton --repeats 5 \
    --skip-reference-above 1100
python -m pytest -q tests/test_scan_backends.py -k "triton and (matches_reference_fp32 or variants or bf16_inputs)" -p no:cacheprovider
# bf16 numerics under CUDA autocast, single and FSDP (NCCL, one rank), against float64.
python tools/bench_numerics.py --device cuda
python tools/bench_train.py --model DiS-B/2 --strategy fsdp --micro-batch 32 --ckpt 1 --steps 10
python tools/bench_train.py --model DiS-H/2 --strategy fsdp --micro-batch 16 --ckpt 1 --steps 5
python tools/bench_train.py --model DiS-H/2 --strategy fsdp --micro-batch 4 --ckpt 0 --steps 5
# Sampling and evaluation on the GPU: tools/sample.py (bf16) on an untrained DiS-S/2 in pixel
# space, then the Inception network's throughput (random weights: speed only).
SAMPLE_DIR=$(mktemp -d)
python - "$SAMPLE_DIR" <<'PY'
import json, sys, time
import numpy as np, torch
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
time python tools/sample.py "$SAMPLE_DIR" --out "$SAMPLE_DIR/samples" --num-samples 512 --batch-size 256 --steps 50 \
    --cfg-scale 1.5 --device cuda
python -c "import numpy as np, sys; z = np.load(sys.argv[1]); print('samples', z['arr_0'].shape, z['arr_0'].dtype)" \
    "$SAMPLE_DIR/samples/samples.npz"
