#!/usr/bin/env bash
# Everything GPU-side in one call (for a session lent a GPU through the device tool):
# the scan backends against each other, the triton tests on the GPU, and FSDP training steps of
# DiS-B/2 and DiS-H/2 (bf16, activation checkpointing) beside the planner's estimate.
#   bash tools/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.txt"
set -u
PYTHONPATH="${PYTHONPATH:-}:$PWD"
export PYTHONPATH
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python tools/bench_scan.py --device cuda --dtype bf16 --backends reference,chunked,triton --repeats 5 \
    --skip-reference-above 1100
python -m pytest -q tests/test_scan_backends.py -k "triton and (matches_reference_fp32 or variants or bf16_inputs)" -p no:cacheprovider
python tools/bench_train.py --model DiS-B/2 --strategy fsdp --micro-batch 32 --ckpt 1 --steps 10
python tools/bench_train.py --model DiS-H/2 --strategy fsdp --micro-batch 16 --ckpt 1 --steps 5
python tools/bench_train.py --model DiS-H/2 --strategy fsdp --micro-batch 4 --ckpt 0 --steps 5
