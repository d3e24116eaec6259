"""Which per-landmark signals should QC flag on? Compares flagging rules on the per-point arrays that
`benchmarks/stress.py --points` writes, every threshold fitted on the AFIDs validation split only (as
`evaluate.py` fits the model's), then scored on the test split and the stress sets.

    python benchmarks/stress.py --models <export> --points          # writes benchmarks/results/points_<export>.npz
    python benchmarks/qc_rules.py benchmarks/results/points_<export>.npz

Signals per point (mm): "radius", the largest semi-axis of the calibrated 90 % ellipsoid of the noise
samples (what QC reads today); "scale_gap", how far the finest scale's deterministic prediction lies from the
scale before it (the chain's own disagreement); "noise_shift", how far the samples' mean lies from the
deterministic finest prediction; "radius_rel", "radius" over its landmark's median "radius" on the validation
split (landmarks differ in how sharp their heatmaps are). A rule flags a point when any of its signals
exceeds the `--quantile` quantile of that signal over the validation points closer than 1.5 mm to the
truth, or when the presence read from the field of view is below `qc.UNCERTAIN_BELOW`.

Then absence: today a landmark is `absent` when its coarse prediction lies outside the image's grid
(presence below `qc.ABSENT_BELOW`); the alternative also calls a flagged landmark absent when the image
is partial (its field of view shorter than `qc.PARTIAL_FRACTION` of the shortest validation image along
some axis, as `qc.fit` sets `partial_fov_mm`: no whole head fits), on the reading that a landmark the model cannot localise in a slab is, most often, not in it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locnet_jax.eval import metrics, qc  # noqa: E402

RULES = {"radius": ("radius",), "radius_rel": ("radius_rel",), "radius_rel+noise_shift": ("radius_rel", "noise_shift"),
         "radius+scale_gap": ("radius", "scale_gap"),
         "radius+noise_shift": ("radius", "noise_shift"), "all three": ("radius", "scale_gap", "noise_shift")}


def load(path: Path) -> dict[str, dict[str, np.ndarray]]:
  """{set name: {array name: array}} from a points_<model>.npz."""
  with np.load(path) as data:
    sets: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
      name, array = key.split("/")
      sets.setdefault(name, {})[array] = data[key]
  return sets


def signals(arrays: dict[str, np.ndarray], scale: float, typical_radius_mm: np.ndarray) -> dict[str, np.ndarray]:
  """(C, L) per signal (module docstring; `typical_radius_mm` (L,) each landmark's median validation radius),
  the radial error and the truth's presence."""
  det, mean = arrays["det_mm"], arrays["mean_mm"]
  radius = qc.radius_mm(arrays["std_mm"], scale)
  return {"error": metrics.radial_errors(mean, arrays["truth_mm"]),
          "radius": radius, "radius_rel": radius / typical_radius_mm,
          "scale_gap": np.linalg.norm(det[:, -1] - det[:, -2], axis=-1),
          "noise_shift": np.linalg.norm(mean - det[:, -1], axis=-1),
          "presence": arrays["presence"], "present": arrays["present"],
          "fov_min_mm": np.broadcast_to(np.min(arrays["fov_mm"], axis=-1)[:, None], det.shape[:1] + det.shape[2:3])}


def flags(s: dict[str, np.ndarray], thresholds: dict[str, float], rule) -> np.ndarray:
  """(C, L) bool: the rule's signals or presence flag the point."""
  flagged = np.nan_to_num(s["presence"], nan=1.0) < qc.UNCERTAIN_BELOW
  for name in rule:
    flagged |= s[name] > thresholds[name]
  return flagged


def absence(s: dict[str, np.ndarray], flagged: np.ndarray, partial_mm: float | None) -> dict[str, int]:
  """Absent calls today (presence < `qc.ABSENT_BELOW`) or, with `partial_mm`, also every flagged point of
  an image whose field of view is shorter than that along some axis; counted against the truth."""
  called = np.nan_to_num(s["presence"], nan=1.0) < qc.ABSENT_BELOW
  if partial_mm is not None:
    called |= flagged & (s["fov_min_mm"] < partial_mm)
  absent, present = s["present"] == 0, s["present"] == 1
  return {"absent": int(absent.sum()), "called": int((called & absent).sum()), "present": int(present.sum()),
          "false": int((called & present).sum())}


def figures(s: dict[str, np.ndarray], thresholds: dict[str, float], rule) -> dict[str, float | int]:
  flagged = flags(s, thresholds, rule)
  scored = (s["present"] == 1) & np.isfinite(s["error"])
  bad, good, bad4 = scored & (s["error"] > 3.0), scored & (s["error"] < qc.GOOD_MM), scored & (s["error"] > 4.0)
  return {"bad": int(bad.sum()), "flag_bad": int((flagged & bad).sum()), "good": int(good.sum()),
          "flag_good": int((flagged & good).sum()), "bad4": int(bad4.sum()), "flag_bad4": int((flagged & bad4).sum())}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("points", nargs="+", help="points_<model>.npz files from benchmarks/stress.py --points")
  parser.add_argument("--quantiles", default="0.97,0.98,0.99")
  args = parser.parse_args()
  for path in args.points:
    sets = load(Path(path))
    val = sets.pop("val")
    scale = metrics.calibration_scale(val["mean_mm"].reshape(-1, 3), val["std_mm"].reshape(-1, 3),
                                      val["truth_mm"].reshape(-1, 3))
    typical = np.median(qc.radius_mm(val["std_mm"], scale), axis=0)
    fit = signals(val, scale, typical)
    good = fit["error"] < qc.GOOD_MM
    per_set = {name: signals(arrays, scale, typical) for name, arrays in sets.items()}
    partial_mm = qc.PARTIAL_FRACTION * float(np.nanmin(val["fov_mm"]))
    print(f"{Path(path).name}: calibration scale {scale:.3f} (validation, {good.sum()} of {good.size} points "
          f"within {qc.GOOD_MM} mm)")
    print("| rule | quantile | stress: flagged of > 3 mm | flagged of < 1.5 mm | t2w: flagged of > 4 mm | "
          "test: flagged of < 1.5 mm | per set: flagged of > 3 mm |")
    print("|" + "---|" * 7)
    quantiles = [float(v) for v in args.quantiles.split(",")]
    names = sorted({name for rule in RULES.values() for name in rule})
    thresholds_at = {q: {k: float(np.quantile(fit[k][good], q)) for k in names} for q in quantiles}
    for q, thresholds in thresholds_at.items():
      for rule_name, rule in RULES.items():
        by_set = {name: figures(s, thresholds, rule) for name, s in per_set.items()}
        stress = [f for name, f in by_set.items() if name != "test"]
        total = {k: sum(f[k] for f in stress) for k in stress[0]}
        t2w, test = by_set.get("t2w"), by_set["test"]
        cells = [rule_name, f"{q:.2f}", f"{_pct(total['flag_bad'], total['bad'])} of {total['bad']}",
                 f"{_pct(total['flag_good'], total['good'])} of {total['good']}",
                 f"{_pct(t2w['flag_bad4'], t2w['bad4'])} of {t2w['bad4']}" if t2w else "–",
                 f"{_pct(test['flag_good'], test['good'])} of {test['good']}",
                 ", ".join(f"{n} {f['flag_bad']}/{f['bad']}" for n, f in by_set.items() if n != "test")]
        print("| " + " | ".join(cells) + " |")
    print("thresholds (mm) at the last quantile: " + ", ".join(f"{k} {v:.2f}" for k, v in thresholds.items()))
    print("\n| absent when | rule | quantile | absent called absent | present called absent (slab) | "
          "present called absent (whole heads) |")
    print("|" + "---|" * 6)
    for q, thresholds in thresholds_at.items():
      for partial in (None, partial_mm):
        for rule_name, rule in (RULES.items() if partial else [("–", ())]):
          counts = {name: absence(s, flags(s, thresholds, rule), partial) for name, s in per_set.items()}
          whole = [c for n, c in counts.items() if n != "slab"]
          slab = counts.get("slab", {"absent": 0, "called": 0, "present": 0, "false": 0})
          cells = ["outside the grid" if partial is None else f"+ flagged in a field of view < {partial:.0f} mm",
                   rule_name, f"{q:.2f}", f"{_pct(slab['called'], slab['absent'])} of {slab['absent']}",
                   f"{_pct(slab['false'], slab['present'])} of {slab['present']}",
                   f"{_pct(sum(c['false'] for c in whole), sum(c['present'] for c in whole))} of "
                   f"{sum(c['present'] for c in whole)}"]
          print("| " + " | ".join(cells) + " |")


def _pct(hit: int, of: int) -> str:
  return f"{100 * hit / of:.0f} %" if of else "–"


if __name__ == "__main__":
  main()
