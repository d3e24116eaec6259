#!/bin/bash
# All CPU performance figures in one go, quiet machine; results in benchmarks/results/cpu_*.txt
# Usage: PYTHON=.venv/bin/python benchmarks/cpu_all.sh   (about 50 minutes on 2 cores; needs torch for the twin)
set -x
cd "$(dirname "$0")/.."
R=benchmarks/results
PY=${PYTHON:-python}
$PY benchmarks/conv_impl.py > $R/cpu_conv_impl.txt 2>&1
$PY benchmarks/model_cost.py --size demo --workloads forward,train,uncertainty,uncertainty_loop > $R/cpu_model_cost_demo.txt 2>&1
$PY benchmarks/model_cost.py --size demo --workloads forward,train,uncertainty --conv-impl xla >> $R/cpu_model_cost_demo.txt 2>&1
$PY benchmarks/torch_twin.py --size demo --repeats 9 --warmup 2 --chunk 1 --conv-impls as_2d > $R/cpu_torch_twin_demo.txt 2>&1
for c in 1 3 50; do $PY benchmarks/model_cost.py --size demo --workloads uncertainty --chunk $c --repeats 3 --warmup 1; done > $R/cpu_chunk_size_demo.txt 2>&1
$PY benchmarks/model_cost.py --size paper --workloads forward,train,uncertainty,uncertainty_loop --repeats 2 --warmup 1 --chunk 1 > $R/cpu_model_cost_paper.txt 2>&1
$PY benchmarks/torch_twin.py --size paper --conv-impls as_2d --repeats 3 --chunk 1 > $R/cpu_torch_twin_paper.txt 2>&1
$PY benchmarks/input_size.py --repeats 2 --warmup 1 > $R/cpu_input_size.txt 2>&1
$PY benchmarks/loader_throughput.py --sizes demo > $R/cpu_loader_demo.txt 2>&1
$PY benchmarks/loader_throughput.py --sizes paper > $R/cpu_loader_paper.txt 2>&1
$PY benchmarks/augment_speed.py --sizes demo --repeats 5 > $R/cpu_augment_speed.txt 2>&1
$PY benchmarks/device_input.py --size demo > $R/cpu_device_input.txt 2>&1
$PY benchmarks/device_input.py --size paper --warmup 1 --repeats 2 >> $R/cpu_device_input.txt 2>&1
$PY benchmarks/dtype_accuracy.py > $R/cpu_dtype_accuracy.txt 2>&1
echo done
