"""What a model's error is made of: a per-landmark offset that repeats in every case (bias), the rest
(spread), and how much of the finest scale's error it inherits from the scale before it. Reads the per-point
arrays that `benchmarks/stress.py --points` writes:

    python benchmarks/stress.py --models <export> --points          # writes benchmarks/results/points_<export>.npz
    python benchmarks/error_parts.py benchmarks/results/points_<export>.npz

Per set (whole-head sets only: a slab's misses are of another kind) and per scale (one deterministic pass,
then the mean of the noise passes), all radial errors in mm over every (case, landmark):
  "mean": the mean error; "|bias|": the mean over landmarks of the length of the landmark's mean error
  vector over the set's cases (world RAS mm); "spread": the mean error once each landmark's own offset on
  that set is taken away; "minus val bias": the mean error once each landmark's offset measured on the
  validation split is taken away (what a per-landmark correction fitted on validation would give: a
  diagnosis, not a method, as the offsets are those of one template's copies).
Then "inherited": the least-squares slope and correlation of the finest scale's error vectors on the
previous scale's (0: the finest scale localises on its own; 1: it keeps the miss it was handed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.qc_rules import load  # noqa: E402

WHOLE_HEAD_SETS = ("train", "val", "test", "t2w", "deform", "thick")  # "train": stress.py --train


def parts(error_vec_mm: np.ndarray, val_bias_mm: np.ndarray) -> dict[str, float]:
  """Summary of (C, L, 3) error vectors (prediction minus truth, mm) given (L, 3) validation offsets."""
  bias = error_vec_mm.mean(axis=0)
  radial = lambda v: float(np.linalg.norm(v, axis=-1).mean())  # noqa: E731
  return {"mean": radial(error_vec_mm), "|bias|": radial(bias), "spread": radial(error_vec_mm - bias),
          "minus val bias": radial(error_vec_mm - val_bias_mm)}


def inherited(finer_vec_mm: np.ndarray, coarser_vec_mm: np.ndarray) -> tuple[float, float]:
  """(slope, correlation) of the finer scale's error components on the coarser scale's."""
  x, y = coarser_vec_mm.ravel(), finer_vec_mm.ravel()
  return float(x @ y / (x @ x)), float(np.corrcoef(x, y)[0, 1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("points", type=Path, help="a points_<model>.npz from benchmarks/stress.py --points")
  args = parser.parse_args(argv)
  sets = load(args.points)
  truth = {name: arrays["truth_mm"] for name, arrays in sets.items()}
  num_scales = sets["val"]["det_mm"].shape[1]
  val_bias = {s: (sets["val"]["det_mm"][:, s] - truth["val"]).mean(axis=0) for s in range(num_scales)}
  val_bias["mean"] = (sets["val"]["mean_mm"] - truth["val"]).mean(axis=0)
  print(f"{args.points.name}: error parts (mm; docstring)")
  print("| set | prediction | mean | abs bias | spread | minus val bias |")
  print("|---|---|---|---|---|---|")
  for name in (n for n in WHOLE_HEAD_SETS if n in sets):
    arrays = sets[name]
    rows = [(f"scale {s} (one pass)", arrays["det_mm"][:, s], val_bias[s]) for s in range(num_scales)]
    rows.append(("mean of the noise passes", arrays["mean_mm"], val_bias["mean"]))
    for label, pred, offsets in rows:
      p = parts(pred - truth[name], offsets)
      print(f"| {name} | {label} | {p['mean']:.2f} | {p['|bias|']:.2f} | {p['spread']:.2f} | {p['minus val bias']:.2f} |")
  print("\ninherited (finest scale's error on the previous scale's, one pass):")
  for name in (n for n in WHOLE_HEAD_SETS if n in sets):
    det = sets[name]["det_mm"]
    slope, corr = inherited(det[:, -1] - truth[name], det[:, -2] - truth[name])
    print(f"  {name}: slope {slope:.2f}, correlation {corr:.2f}")
  test_bias = (sets["test"]["mean_mm"] - truth["test"]).mean(axis=0) if "test" in sets else None
  if test_bias is not None:
    print(f"\nper-landmark offsets, validation against test (mean of the noise passes): correlation "
          f"{np.corrcoef(val_bias['mean'].ravel(), test_bias.ravel())[0, 1]:.2f}; mean offset vector over "
          f"landmarks (a shared shift, e.g. half a voxel, would show here): validation "
          f"{np.array2string(val_bias['mean'].mean(axis=0), precision=2)}, test "
          f"{np.array2string(test_bias.mean(axis=0), precision=2)} mm")


if __name__ == "__main__":
  main()
