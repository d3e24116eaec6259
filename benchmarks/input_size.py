"""Cost against input size: the multi-scale Loc-Net vs the single-scale Loc-Net on the whole volume.

    python benchmarks/input_size.py                    # 112^3, 224^3, 448^3 over a 224 mm field of view
    python benchmarks/input_size.py --max-run-gb 16    # compile everything, run what XLA says fits

One field of view (224 mm, 2 landmarks, the paper's U-Net: 16 base channels), sampled at 2, 1 and 0.5 mm
(112^3, 224^3, 448^3 voxels). The multi-scale model always starts with the whole volume at 4 mm (56^3) and
adds one 56^3 patch net per halving of the spacing (4/2, 4/2/1, 4/2/1/0.5 mm); the single-scale Loc-Net is
one U-Net with one more level (paper, footnote 2) over the whole volume at the finest spacing. Every
workload is compiled; it is run (median of --repeats) only when XLA's own memory plan (temporaries +
arguments) fits under --max-run-gb, otherwise its row says how much it would need. Each in its own process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_cost

FOV_MM = 224.0


def specs(num_landmarks: int = 2) -> list[tuple[str, dict]]:
  rows = []
  for edge in (112, 224, 448):
    spacing = FOV_MM / edge
    multi = tuple(s for s in (4.0, 2.0, 1.0, 0.5) if s >= spacing)
    rows.append((f"multi-scale {edge}^3", dict(num_landmarks=num_landmarks, spacings=multi, finest=edge, patch=56,
                                                unet=dict(depth=2, base_channels=16))))
    rows.append((f"single-scale {edge}^3", dict(num_landmarks=num_landmarks, spacings=(spacing,), finest=edge,
                                                 patch=56, unet=dict(depth=3, base_channels=16))))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workloads", default="forward,train")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max-run-gb", type=float, default=16.0)
  parser.add_argument("--conv-impl", default="auto", choices=("auto", "xla", "as_2d"))
  parser.add_argument("--only", default="", help="comma-separated substrings of row names to keep")
  args = parser.parse_args()
  keep = [s for s in args.only.split(",") if s]
  print(f"field of view {FOV_MM:.0f} mm, run if XLA's plan <= {args.max_run_gb} GB; median of {args.repeats} "
        f"after {args.warmup} warm-up")
  print("| model, input | workload | GFLOP | XLA temp GB | median s | GFLOP/s | peak RSS GB | peak device GB |")
  print("|---|---|---|---|---|---|---|---|")
  for name, spec in specs():
    if keep and not any(k in name for k in keep):
      continue
    for workload in args.workloads.split(","):
      r = model_cost.measure_in_subprocess(workload, spec, warmup=args.warmup, repeats=args.repeats,
                                           conv_impl=args.conv_impl, max_run_gb=args.max_run_gb)
      if isinstance(r, str):
        print(f"| {name} | {workload} | failed: {r} | | | | | |", flush=True)
      elif r.get("skipped"):
        print(f"| {name} | {workload} | {r['gflop']:.0f} | {r['temp_gb']:.1f} | not run: needs more than "
              f"{args.max_run_gb} GB | | | |", flush=True)
      else:
        print(f"| {name} | {workload} | {r['gflop']:.1f} | {r['temp_gb']:.2f} | {r['median_s']:.3f} | "
              f"{r['gflops_per_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['peak_device_gb']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
