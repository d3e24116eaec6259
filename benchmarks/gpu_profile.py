"""Where the paper-size model's device time goes: a kernel profile and the U-Net's cost per patch.

    python benchmarks/gpu_profile.py --out DIR      # on a GPU machine (benchmarks/gpu_all.sh profile)

For float32 and bfloat16: (1) the forward pass, training step and 50-pass uncertainty of `model_cost`'s
paper size run under `jax.profiler.trace`; the Chrome trace it writes is read back and its device events
summed by kernel or XLA op (top names, their share, and busy time against wall time: a low share means the device
waits for launches or the host); (2) one U-Net alone on B patches of 56^3 (B = 1, 2, 8, 100): time per
patch shows whether bigger batches fill the device; (3) the forward pass with float32 at "highest"
precision (no TF32) against the default, which tells whether the default already uses TF32 tensor cores.
Convolutions are channels-last as in train.py (`xla_env`); XLA_FLAGS=--xla_gpu_force_conv_nhwc=false
profiles XLA's own layouts. Prints Markdown tables; needs nothing beyond the library's own packages.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model_cost import NUM_SAMPLES, SIZES, build_workloads
from benchmarks.timing import timed

CONV_WORDS = ("conv", "xmma", "implicit", "fprop", "dgrad", "wgrad", "cudnn", "cutlass", "gemm", "sm90", "sm80")


def device_event_times(trace_dir: Path) -> dict[str, tuple[dict[str, list[float]], float]]:
  """Per device timeline ("pid name / thread name") of the newest Chrome trace under `trace_dir`:
  ({event name: [count, total µs]}, span µs from the first event's start to the last one's end)."""
  path = max(trace_dir.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  with gzip.open(path, "rt") as f:
    events = json.load(f)["traceEvents"]
  meta = [e for e in events if e.get("ph") == "M"]
  processes = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
  device_pids = {pid for pid, name in processes.items() if "GPU" in name or "TPU" in name}
  if not device_pids:  # a CPU run: the host's timelines, only to check this parser
    device_pids = set(processes)
  lines: dict[str, tuple[dict[str, list[float]], list[float]]] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
      line = f"{processes[e['pid']]} / {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"
      totals, span = lines.setdefault(line, (collections.defaultdict(lambda: [0, 0.0]), [float("inf"), 0.0]))
      name = re.sub(r"\.\d+$", "", e["name"])  # XLA's op instances (fusion.12) summed under their stem
      totals[name][0] += 1
      totals[name][1] += float(e["dur"])
      span[0], span[1] = min(span[0], float(e["ts"])), max(span[1], float(e["ts"]) + float(e["dur"]))
  return {line: (dict(totals), span[1] - span[0]) for line, (totals, span) in lines.items()}


def _workloads(dtype: str, size: str):
  """{name: (jitted fn, args)}: model_cost's forward, train step and 50-pass uncertainty (one chunk), cuDNN."""
  return build_workloads(SIZES[size], conv_impl="xla", dtype=dtype, chunk_size=NUM_SAMPLES)[3]


def profile(dtype: str, size: str, out: Path, calls: int, top: int) -> None:
  """Times each workload, traces `calls` calls of it, and prints the busiest device timelines' top events."""
  import jax
  for name, (fn, args) in _workloads(dtype, size).items():
    compiled = fn.lower(*args).compile()
    median, _, _ = timed(lambda: jax.block_until_ready(compiled(*args)), warmup=3, repeats=10)
    trace_dir = out / f"trace_{dtype}_{name}"
    with jax.profiler.trace(str(trace_dir)):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    print(f"\n{dtype} {name}: wall {median * 1e3:.2f} ms a call (median of 10); {calls} calls traced")
    lines = sorted(device_event_times(trace_dir).items(), key=lambda kv: -sum(t for _, t in kv[1][0].values()))
    for line, (totals, span_us) in lines[:4]:  # the busiest timelines: streams' kernels, XLA ops, modules
      busy_us = sum(t for _, t in totals.values())
      conv_us = sum(t for k, (_, t) in totals.items() if any(w in k.lower() for w in CONV_WORDS))
      print(f"\n{line}: busy {busy_us / calls / 1e3:.2f} ms a call, span {span_us / calls / 1e3:.2f} ms a call, "
            f"{sum(c for c, _ in totals.values()) / calls:.0f} events a call, convolution-like names "
            f"{100 * conv_us / max(busy_us, 1e-9):.0f} % of busy")
      print("| event | a call | µs a call | share of busy |\n|---|---|---|---|")
      for event, (count, total) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {event[:100]} | {count / calls:.0f} | {total / calls:.1f} | {100 * total / busy_us:.1f} % |")
    sys.stdout.flush()


def unet_per_patch(dtype: str, size: str, batches: tuple[int, ...]) -> None:
  """One U-Net of the size forward on B patches: ms per call and per patch."""
  import jax
  import jax.numpy as jnp

  from locnet_jax.model.unet import UNet3D
  spec = SIZES[size]
  net = UNet3D(out_channels=spec["num_landmarks"], conv_impl="xla", dtype=dtype, **spec["unet"])
  shape = (spec["patch"],) * 3
  params = net.init(jax.random.key(0), jnp.zeros((1, *shape, 1)))["params"]
  print(f"\nU-Net alone, {dtype}, patches of {shape[0]}^3\n| patches | ms a call | ms a patch |\n|---|---|---|")
  for b in batches:
    x = jax.random.normal(jax.random.key(b), (b, *shape, 1))
    fn = jax.jit(lambda p, x: net.apply({"params": p}, x)).lower(params, x).compile()
    median, _, _ = timed(lambda: jax.block_until_ready(fn(params, x)), warmup=3, repeats=10)
    print(f"| {b} | {median * 1e3:.2f} | {median * 1e3 / b:.3f} |")
    sys.stdout.flush()


def precision_check(size: str) -> None:
  import jax
  print("\nfloat32 forward by matmul precision\n| precision | ms |\n|---|---|")
  fn, args = _workloads("float32", size)["forward"]
  for precision in ("default", "highest"):
    with jax.default_matmul_precision(precision):  # read when the function is traced
      compiled = fn.lower(*args).compile()
    median, _, _ = timed(lambda: jax.block_until_ready(compiled(*args)), warmup=3, repeats=10)
    print(f"| {precision} | {median * 1e3:.2f} |")
    sys.stdout.flush()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=Path, required=True, help="folder for the traces")
  parser.add_argument("--size", default="paper", choices=["paper", "paper6", "demo"])
  parser.add_argument("--calls", type=int, default=5, help="calls of each workload inside the trace")
  parser.add_argument("--top", type=int, default=12, help="kernels listed per workload")
  parser.add_argument("--parts", default="profile,unet,precision", help="which of profile, unet, precision")
  args = parser.parse_args()
  import jax
  print(f"device={jax.devices()[0].device_kind}  jax={jax.__version__}  XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'  "
        f"{time.strftime('%Y-%m-%d %H:%M')}")
  parts = args.parts.split(",")
  for dtype in ("float32", "bfloat16"):
    if "profile" in parts:
      profile(dtype, args.size, args.out, args.calls, args.top)
  for dtype in ("float32", "bfloat16"):
    if "unet" in parts:
      unet_per_patch(dtype, args.size, (1, 2, 8, 100))
  if "precision" in parts:
    precision_check(args.size)

if __name__ == "__main__":
  main()
