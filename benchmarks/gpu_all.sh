#!/bin/bash
# The GPU figures of the README's performance section, as one prepared run on a device machine:
#   OUT=<folder> benchmarks/gpu_all.sh [STEP...]    # STEPs: bf16 tf32 feed twin f32 f32base as_2d paper6 input profile (default: all)
# Results as gpu_*.txt in $OUT (rows are written as they are measured, so a timeout keeps the finished ones).
# Every step has its own time limit; all of them take over 20 minutes (2026-11-26, H100/H200: f32base ~105 s,
# bf16 ~125 s, tf32 ~105 s, feed ~80 s, profile ~120 s, the twin ~80 s) — pick steps to fit a device lease.
# The benchmarks run convolutions channels-last (locnet_jax/xla_env.py); XLA_FLAGS=--xla_gpu_force_conv_nhwc=false
# in the environment measures XLA's own layouts.
# Needs jax with CUDA, flax, optax, orbax, ml_collections, nibabel (imported by the pipeline; the volumes are
# random), torch with CUDA. The device tool's machine lacks ml_collections and nibabel: carry their wheels (.whl).
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
STEPS=${*:-bf16 tf32 feed twin f32 as_2d paper6 input}
step() { echo "$(date +%T) $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_device.txt" 2>&1
run_cost() {  # size, conv impl, dtype, workloads, chunk, timeout
  step "model_cost $*"
  timeout "$6" $PY benchmarks/model_cost.py --size "$1" --conv-impl "$2" --dtype "$3" --workloads "$4" \
    --chunk "$5" --warmup 3 --repeats 10 >> "$OUT/gpu_model_cost.txt" 2>&1
}
for s in $STEPS; do
  case $s in
    bf16) run_cost paper xla bfloat16 forward,train,uncertainty 50 200 ;;
    tf32) JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32 run_cost paper xla float32 forward,train,uncertainty 50 200 ;;
    f32) run_cost paper xla float32 forward,train,uncertainty,uncertainty_loop 50 150 ;;
    f32base) run_cost paper xla float32 forward,train,uncertainty 50 120 ;;  # the baseline for another card
    as_2d) run_cost paper as_2d float32 forward,train,uncertainty 50 120 ;;
    paper6) run_cost paper6 xla bfloat16 forward,train,uncertainty 10 150 ;;
    feed) step device_input
      timeout 150 $PY benchmarks/device_input.py --size paper --cases 8 --warmup 3 --repeats 10 >> "$OUT/gpu_device_input.txt" 2>&1 ;;
    twin)  # JAX and PyTorch on the same GPU: JAX must not pre-allocate 75 % of its memory
      step torch_twin
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 $PY benchmarks/torch_twin.py --size paper --device cuda \
        --conv-impls xla --chunk 50 --warmup 3 --repeats 10 >> "$OUT/gpu_torch_twin.txt" 2>&1 ;;
    profile) step gpu_profile  # where the device time goes; traces left on the machine
      timeout 300 $PY benchmarks/gpu_profile.py --out /tmp/locnet_traces --calls 3 >> "$OUT/gpu_profile.txt" 2>&1 ;;
    input)
      step input_size
      timeout 200 $PY benchmarks/input_size.py --max-run-gb 70 --warmup 2 --repeats 5 >> "$OUT/gpu_input_size.txt" 2>&1 ;;
    *) echo "unknown step $s" ;;
  esac
done
step done
