#!/bin/bash
# The GPU figures of the README's performance section in one short run (about 6-8 minutes on an H100).
# Device machine: `OUT=<folder> benchmarks/gpu_all.sh` (the device tool's $OUT); results as gpu_*.txt in it.
# Needs jax with CUDA, flax, optax, orbax, ml_collections (no nibabel: the benchmarks use random volumes).
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_device.txt" 2>&1
for impl in xla as_2d; do  # cuDNN 3-D convolutions vs 2-D slices (auto = xla on GPUs)
  timeout 240 $PY benchmarks/model_cost.py --size paper --workloads forward,train,uncertainty --conv-impl $impl \
    --warmup 3 --repeats 10 --chunk 50 >> "$OUT/gpu_model_cost_paper.txt" 2>&1
done
timeout 200 $PY benchmarks/model_cost.py --size paper6 --workloads forward,train,uncertainty --warmup 3 \
  --repeats 10 --chunk 10 >> "$OUT/gpu_model_cost_paper.txt" 2>&1
timeout 300 $PY benchmarks/input_size.py --max-run-gb 70 --warmup 2 --repeats 5 > "$OUT/gpu_input_size.txt" 2>&1
echo done
