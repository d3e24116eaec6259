"""Compile time, run time, FLOPs and memory of the multi-scale Loc-Net's forward pass and training step.

    python benchmarks/model_cost.py --size paper   # 4 scales 4/2/1/0.5 mm, 56^3 patches, 448^3 input
    python benchmarks/model_cost.py --size demo    # the CPU demo size
    python benchmarks/model_cost.py --size paper --workloads forward,train,uncertainty,uncertainty_loop

Workloads: forward (one noisy pass), train (one Adam step), uncertainty (50 noise samples in one jitted
call, `inference.make_uncertainty`: the coarse scales once, the finest scale on --chunk x K patches at a
time; its samples are checked against the loop's), uncertainty_loop (50 single passes,
each a jitted call, as a Python loop would run them).

Each workload runs in its own process, so its peak resident memory (ru_maxrss) is its own. Times are the
median (and min-max) of --repeats runs after --warmup runs, each ended with block_until_ready. FLOPs and
XLA temp memory come from the compiled executable's cost and memory analyses (on a GPU the FLOPs from the
lowered, pre-optimisation program, as the compiled one leaves cuDNN's convolutions out; jax 0.11.2 gives
none there, so nan: the count is the CPU row's, the same program); on a GPU, peak device
memory from the device's memory statistics. --dtype bfloat16 runs the U-Nets' layers in bfloat16
(`UNet3D.dtype`); JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32 in the environment lets float32 convolutions use
TF32 tensor cores on a GPU (the header's precision; jax's default already lets cuDNN use TF32 there, as a
run at "highest" shows). Convolutions run channels-last on a GPU (`xla_env`, as in train.py); the header
shows XLA_FLAGS. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from locnet_jax import xla_env

xla_env.prefer_channels_last_convolutions()  # as train.py and evaluate.py do: GPU convolutions in NDHWC

SIZES = {
    # name: (num_landmarks, spacings coarse->fine mm, finest grid size, patch, unet)
    "paper": dict(num_landmarks=2, spacings=(4.0, 2.0, 1.0, 0.5), finest=448, patch=56,
                  unet=dict(depth=2, base_channels=16)),
    "paper6": dict(num_landmarks=6, spacings=(4.0, 2.0, 1.0, 0.5), finest=448, patch=56,
                   unet=dict(depth=2, base_channels=16)),  # the paper's sizes with our 6 AFIDs
    "demo": dict(num_landmarks=6, spacings=(8.0, 4.0, 2.0), finest=128, patch=24,
                 unet=dict(depth=2, base_channels=8)),
}
# the single-scale Loc-Net baseline on the whole volume (one more U-Net level, paper footnote 2)
SIZES["single224"] = dict(num_landmarks=2, spacings=(1.0,), finest=224, patch=56, unet=dict(depth=3, base_channels=16))
SIZES["single448"] = dict(num_landmarks=2, spacings=(0.5,), finest=448, patch=56, unet=dict(depth=3, base_channels=16))
NUM_SAMPLES = 50  # test-time noise passes (paper: 50)


def _inputs(spec: dict):
  """Random volumes (1, n, n, n) per scale over the same field of view, their affines, and targets."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  fov_mm = spec["finest"] * spec["spacings"][-1]
  volumes, affines = [], []
  for s, spacing in enumerate(spec["spacings"]):
    n = int(round(fov_mm / spacing))
    volumes.append(jax.random.normal(jax.random.key(s), (1, n, n, n), jnp.float32))
    affine = np.eye(4)
    affine[:3, :3] *= spacing
    affine[:3, 3] = -fov_mm / 2 + spacing / 2
    affines.append(jnp.asarray(affine[None], jnp.float32))
  target = jnp.asarray(np.random.default_rng(0).uniform(-30, 30, (1, spec["num_landmarks"], 3)), jnp.float32)
  return volumes, affines, target


def build_workloads(spec: dict, *, conv_impl: str = "auto", dtype: str = "float32", chunk_size: int = 10):
  """(model, train state, noise key, {workload: (jitted fn, args)}) for forward (one noisy pass; also the
  loop's single pass), train (one Adam step) and, with several scales, uncertainty (50 samples in one call,
  in chunks)."""
  import jax

  from locnet_jax.model import inference, losses
  from locnet_jax.model.locnet import MultiScaleLocNet
  from locnet_jax.train import steps

  volumes, affines, target = _inputs(spec)
  model = MultiScaleLocNet(spec["num_landmarks"], num_scales=len(spec["spacings"]),
                           patch_shape=(spec["patch"],) * 3, unet={**spec["unet"], "conv_impl": conv_impl, "dtype": dtype})
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=volumes, affines=affines,
                                      learning_rate=5e-4)
  key = jax.random.key(1) if len(spec["spacings"]) > 1 else None  # a single scale has no noise injection
  weights = losses.loss_weights(250, num_epochs=500, num_scales=len(spec["spacings"]))
  forward = jax.jit(lambda p, v, a, k: model.apply({"params": p}, v, a, noise_key=k)["pred_mm"])
  step = jax.jit(lambda s, b, k, w: steps.train_step(s, b, k, weights=w))
  workloads = {"forward": (forward, (state.params, volumes, affines, key)),
               "train": (step, (state, {"volumes": volumes, "affines": affines, "target_mm": target}, key, weights))}
  if key is not None:  # the coarse scales once, the finest for all samples: one call, in chunks
    uncertainty = inference.make_uncertainty(model, num_samples=NUM_SAMPLES, chunk_size=chunk_size)
    workloads["uncertainty"] = (uncertainty, (state.params, volumes, affines, key))
  return model, state, key, workloads


def _measure(workload: str, spec: dict, warmup: int, repeats: int, chunk_size: int = 10,
             conv_impl: str = "auto", max_run_gb: float = float("inf"), dtype: str = "float32") -> dict:
  import jax
  import numpy as np

  from locnet_jax.model import unet

  model, state, key, workloads = build_workloads(spec, conv_impl=conv_impl, dtype=dtype, chunk_size=chunk_size)
  # the loop: one jitted single pass per sample
  fn, args = workloads["forward" if workload == "uncertainty_loop" else workload]
  calls = NUM_SAMPLES if workload == "uncertainty_loop" else 1
  max_diff_mm = None
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # on a GPU the compiled program's count leaves cuDNN's convolutions out: the lowered one's, else none
  cost = lowered.cost_analysis() if jax.default_backend() == "gpu" else compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  memory = compiled.memory_analysis()
  need_gb = (getattr(memory, "temp_size_in_bytes", 0) + getattr(memory, "argument_size_in_bytes", 0)) / 1e9
  if need_gb > max_run_gb:  # compiled but not run: XLA's own plan says it does not fit
    return dict(workload=workload, compile_s=compile_s, gflop=float(cost.get("flops", float("nan"))) / 1e9,
                temp_gb=getattr(memory, "temp_size_in_bytes", float("nan")) / 1e9, skipped=True,
                params=sum(x.size for x in jax.tree.leaves(state.params)), device=jax.devices()[0].device_kind,
                jax=jax.__version__, repeats=0, conv_impl=unet.resolve_conv_impl(conv_impl), dtype=dtype)
  times = []
  keys = jax.random.split(key, calls) if calls > 1 else None
  for i in range(warmup + repeats):
    t0 = time.perf_counter()
    if calls == 1:
      jax.block_until_ready(compiled(*args))
    else:
      jax.block_until_ready([compiled(*args[:-1], keys[c]) for c in range(calls)])
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  flops = float(cost.get("flops", float("nan"))) * calls
  if workload == "uncertainty":  # XLA counts a lax.map body once: no true total; check the samples instead
    flops = float("nan")
    single = jax.jit(lambda p, v, a, k: model.apply({"params": p}, v, a, noise_key=k)["pred_mm"][:, -1])
    loop = np.stack([single(*args[:-1], k) for k in jax.random.split(key, NUM_SAMPLES)], axis=1)
    max_diff_mm = float(np.max(np.abs(np.asarray(compiled(*args)["samples_mm"]) - loop)))
  stats = jax.devices()[0].memory_stats() or {}
  median = statistics.median(times)
  return dict(workload=workload, compile_s=compile_s, median_s=median, min_s=min(times),
              max_s=max(times), gflop=flops / 1e9, gflops_per_s=flops / 1e9 / median,
              temp_gb=getattr(memory, "temp_size_in_bytes", float("nan")) / 1e9,
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
              peak_device_gb=stats.get("peak_bytes_in_use", float("nan")) / 1e9,
              params=sum(x.size for x in jax.tree.leaves(state.params)),
              device=jax.devices()[0].device_kind, jax=jax.__version__, repeats=repeats,
              max_diff_vs_loop_mm=max_diff_mm, chunk_size=chunk_size,
              conv_impl=unet.resolve_conv_impl(conv_impl), dtype=dtype,
              precision=jax.config.jax_default_matmul_precision or "default",
              xla_flags=os.environ.get("XLA_FLAGS", ""))


def measure_in_subprocess(workload: str, spec: dict, *, warmup: int, repeats: int, chunk: int = 10,
                          conv_impl: str = "auto", max_run_gb: float = float("inf"),
                          dtype: str = "float32") -> dict | str:
  """`_measure` in a fresh process (its own peak memory); the row dict, or the error's last line."""
  done = subprocess.run([sys.executable, __file__, "--one", workload, "--spec-json", json.dumps(spec),
                         "--warmup", str(warmup), "--repeats", str(repeats), "--chunk", str(chunk),
                         "--conv-impl", conv_impl, "--max-run-gb", str(max_run_gb), "--dtype", dtype],
                        capture_output=True, text=True)
  if done.returncode:
    return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:160]
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sorted(SIZES), default="paper")
  parser.add_argument("--workloads", default="forward,train")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--chunk", type=int, default=10, help="noise samples per chunk of the uncertainty call")
  parser.add_argument("--conv-impl", default="auto", choices=("auto", "xla", "as_2d"),
                      help="how the U-Nets compute 3-D convolutions (locnet_jax.unet.CONV_IMPLS)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype of the U-Nets (locnet_jax.unet.DTYPES)")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one workload, print JSON
  parser.add_argument("--spec-json", help=argparse.SUPPRESS)  # internal: the size spec of --one
  parser.add_argument("--max-run-gb", type=float, default=float("inf"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(_measure(args.one, json.loads(args.spec_json), args.warmup, args.repeats, args.chunk,
                              args.conv_impl, args.max_run_gb, args.dtype)))
    return
  rows = []
  for workload in args.workloads.split(","):  # each row printed as soon as it is measured (a timeout keeps them)
    row = measure_in_subprocess(workload, SIZES[args.size], warmup=args.warmup, repeats=args.repeats,
                                chunk=args.chunk, conv_impl=args.conv_impl, dtype=args.dtype)
    if isinstance(row, str):  # e.g. out of device memory: a finding, reported as a row
      print(f"| {workload} | failed: {row} |", flush=True)
      continue
    if not rows:
      print(f"size={args.size} {SIZES[args.size]}  params={row['params']:,}  device={row['device']}  "
            f"conv={row['conv_impl']}  dtype={row['dtype']}  precision={row['precision']}  XLA_FLAGS='{row.get('xla_flags', '')}'  jax={row['jax']}  median of {row['repeats']} after "
            f"{args.warmup} warm-up runs")
      print("| workload | compile s | median ms (min-max) | GFLOP | GFLOP/s | XLA temp GB | peak RSS GB | "
            "peak device GB |")
      print("|---|---|---|---|---|---|---|---|")
    rows.append(row)
    ms = lambda x: f"{1e3 * x:.1f}" if x < 1 else f"{1e3 * x:.0f}"  # noqa: E731
    print(f"| {row['workload']} | {row['compile_s']:.1f} | {ms(row['median_s'])} ({ms(row['min_s'])}-"
          f"{ms(row['max_s'])}) | {row['gflop']:.1f} | {row['gflops_per_s']:.1f} | {row['temp_gb']:.2f} | "
          f"{row['peak_rss_gb']:.2f} | {row['peak_device_gb']:.2f} |", flush=True)
  by_name = {r["workload"]: r for r in rows}
  if "uncertainty" in by_name and "uncertainty_loop" in by_name:
    print(f"batched {NUM_SAMPLES}-pass uncertainty (chunks of {args.chunk}) is "
          f"{by_name['uncertainty_loop']['median_s'] / by_name['uncertainty']['median_s']:.1f}x faster than the loop of "
          f"single passes; its samples differ from the loop's by at most {by_name['uncertainty']['max_diff_vs_loop_mm']:.1e} mm")


if __name__ == "__main__":
  main()
