#!/usr/bin/env bash
# Everything GPU-side in one call (for a session lent a GPU through the device tool):
# the scan backends against each other, the triton tests on the GPU, bf16 numerics against
# float64, FSDP training steps of DiS-B/2 and DiS-H/2 (bf16, activation checkpointing) beside
# the planner's estimate, sampling, and context parallelism on the GPU.
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
# Meta-device init and memory-bounded sampling on the GPU: DiS-H/2 under FSDP (one rank), one
# step, then an 80-image guided grid in planned micro-batches; peak memory of each phase.
GRID_DIR=$(mktemp -d)
cat >"$GRID_DIR/grid.py" <<'PY'
import sys, time, torch
from dis_dist.config import load_config
from dis_dist.data.shards import write_random_cache
from dis_dist.train.trainer import Trainer
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
python -m torch.distributed.run --standalone --nproc_per_node=1 "$GRID_DIR/grid.py" "$GRID_DIR"
# Context parallelism on the GPU: two ranks sharing it over gloo (NCCL refuses two ranks on one
# GPU), a DiS-S-shaped model (width 368, depth 4) at L = 4098 split over both against the unsplit
# model (outputs and every gradient; fp32 within 1e-5 with the GPU's scan backend, fp64 within
# 1e-10 with the chunked one).
CP_DIR=$(mktemp -d)
cat >"$CP_DIR/spec.json" <<JSON
{"cases": [{"model": {"width": 368, "depth": 4, "input_size": 128}, "batch": 2, "dtype": "float32",
            "backend": "auto", "checkpointing": true, "splits": [2], "device": "cuda"},
           {"model": {"width": 368, "depth": 4, "input_size": 64}, "batch": 2, "dtype": "float64",
            "backend": "chunked", "checkpointing": false, "splits": [2], "device": "cuda"}],
 "out": "$CP_DIR/errors.json"}
JSON
python -m torch.distributed.run --standalone --nproc_per_node=2 tests/cp_run.py "$CP_DIR/spec.json" \
    && echo "context parallel on cuda, max relative errors (fp32 L 4098, fp64 L 1026; 2 ranks): $(cat "$CP_DIR/errors.json")"
