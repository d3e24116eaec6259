"""Scores exported models on the AFIDs test split and the stress sets (another contrast, a partial field of
view, another anatomy, thick slices), with presence and QC, and prints one table.

    python -m locnet_jax.data.afids_stress --out data/afids-stress --num-cases 12     # once
    python benchmarks/stress.py --models pretrained/afids6,/tmp/afids6-old [--num-noise-samples 50]

Each model predicts every case with its own preprocessing and QC thresholds (from its model.json; a model
without them calls every point ok); the prediction is the mean of the noise samples. Per set: mean /
median / p90 / max radial error of the landmarks in the image, the share of errors > 3 mm flagged
(`uncertain` or `absent`) and of errors < 1.5 mm flagged, absent landmarks called absent (slab), present
ones called absent (the false-absent rate), and the coverage of the calibrated 90 % ellipsoids; then per
landmark, next to the four AFIDs raters' own error on the test split (`landmark_table`). Writes
<out>/stress_<model>.json with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locnet_jax import dataset, from_config, geometry  # noqa: E402
from locnet_jax.data import afids  # noqa: E402
from locnet_jax.eval import metrics, predict, qc, restore, scoring  # noqa: E402


def _sets(args) -> dict[str, tuple[Path, str]]:
  sets = {"test": (Path(args.afids) / "dataset.json", "test")}
  for kind in filter(None, args.kinds.split(",")):  # --kinds= scores the AFIDs splits alone
    sets[kind] = (Path(args.stress) / kind / "dataset.json", "test")
  return sets


def score_model(folder: Path, sets: dict, *, num_samples: int | None, log, points: dict | None = None) -> dict:
  """Every set's `scoring.score` results (+ pooled stress-set QC); with `points` (a dict), fills it with
  each set's per-point arrays (`point_arrays`) for fitting and comparing QC rules offline."""
  config = restore.saved_config(folder)
  settings = from_config.preprocess_settings(config.data)
  checks = qc.load(folder)
  samples = config.eval.num_noise_samples if num_samples is None else num_samples
  trained, out, pooled = None, {}, []
  for name, (path, split) in sets.items():
    manifest = dataset.load_manifest(path)
    examples = from_config.load_split(manifest, split, settings, manifest.path.parent / ".locnet_cache")
    if trained is None:
      trained = restore.restore(config, folder, example=examples[0])
    start = time.perf_counter()
    records = predict.predict_cases(trained, examples, num_samples=samples, chunk_size=config.eval.chunk_size,
                                    seed=config.seed)
    records = [qc.annotate(r, checks) for r in records]
    results = scoring.score(records, examples, model_names=trained.names, data_names=manifest.landmarks,
                            calibration=qc.calibration(checks))
    results["wall_s"] = round(time.perf_counter() - start, 1)
    out[name] = results
    if points is not None:
      points[name] = point_arrays(records, examples, model_names=trained.names, data_names=manifest.landmarks)
    if name not in ("test", "val"):  # pooled over the stress sets: the QC targets
      _, mi, di = scoring.matched(trained.names, manifest.landmarks)
      for example, case, record in zip(examples, results["per_case"], records):
        errors = np.array([np.nan if e is None else e for e in case["error_mm"]])
        presence = record["presence"][mi] if record.get("presence") is not None else np.full(len(mi), np.nan)
        depth = (np.full((len(record["pred_mm"]), len(mi)), np.nan) if example.grid is None else  # (S, L) mm
                 geometry.depth_in_grid_mm(np.asarray(record["pred_mm"])[:, mi], *example.grid))
        pooled.append((errors, np.array(case.get("status", ["ok"] * len(mi))), example.presence()[di], presence,
                       depth.T, np.full(len(mi), name)))
    log(f"{folder.name} {name}: {results['overall'].get('mean_mm', float('nan')):.2f} mm mean over "
        f"{results['overall']['count']} points ({results['wall_s']} s)")
  if pooled:
    errors, status, present, presence, depth, set_name = (np.concatenate(parts) for parts in zip(*pooled))
    out["all stress sets"] = {"overall": metrics.summarize_errors(errors[np.isfinite(errors)]),
                              "qc": qc.summarize(errors, status, present)}
    if np.isfinite(presence).any():  # how well presence separates: quantiles per truth
      out["all stress sets"]["presence_p10_p50_p90"] = {"absent": _quantiles(presence[present == 0]),
                                                        "present": _quantiles(presence[present == 1])}
      log(f"{folder.name} presence p10/p50/p90: {out['all stress sets']['presence_p10_p50_p90']}")
      below = presence < qc.ABSENT_BELOW  # presence alone, whatever QC the model carries
      whole = (present == 1) & (set_name != "slab")
      out["all stress sets"]["presence_alone"] = separation = {
          "absent_recall": _share(below, present == 0), "false_absent_in_slabs": _share(below, (present == 1) & ~whole),
          "false_absent_whole_heads": _share(below, whole), "auc": _auc(presence[present == 0], presence[present == 1]),
          "auc_in_slabs": _auc(presence[present == 0], presence[(present == 1) & ~whole])}
      log(f"{folder.name} presence below {qc.ABSENT_BELOW} alone: {separation}")
    # which scale's point to read against the field of view (qc.PRESENCE_SCALE): outside the grid = absent
    by_scale = {f"scale{s}": {"absent_recall": _share(depth[:, s] < 0, present == 0),
                              "false_absent_rate": _share(depth[:, s] < 0, present == 1),
                              "depth_p10_p50_p90_absent": _quantiles(depth[present == 0, s]),
                              "depth_p10_p50_p90_present": _quantiles(depth[present == 1, s])}
                for s in range(depth.shape[1])}
    out["all stress sets"]["outside_grid_by_scale"] = by_scale
    for name, figures in by_scale.items():
      log(f"{folder.name} {name} outside the grid: {figures}")
  return out


def point_arrays(records: list[dict], examples, *, model_names, data_names) -> dict[str, np.ndarray]:
  """Per case and landmark the data set scores (C, L, ...): truth and predictions in RAS mm ("truth_mm",
  "mean_mm" of the noise samples, "det_mm" (C, S, L, 3) every scale's deterministic pass), the raw noise
  std "std_mm", "presence" (NaN unknown), "present" (truth: 1 in the image, 0 absent, NaN unknown), and per
  case "fov_mm" (C, 3), the image's field of view along its voxel axes (NaN unknown)."""
  _, mi, di = scoring.matched(model_names, data_names)
  det = np.stack([np.asarray(r["pred_mm"])[:, mi] for r in records])
  nan = np.full(det.shape[:1] + det.shape[2:], np.nan)  # (C, L, 3)
  return {"truth_mm": np.stack([ex.target_mm[di] for ex in examples]), "det_mm": det,
          "mean_mm": np.stack([r["mean_mm"][mi] for r in records]) if records[0]["mean_mm"] is not None else det[:, -1],
          "std_mm": np.stack([r["std_mm"][mi] for r in records]) if records[0]["std_mm"] is not None else nan,
          "presence": np.stack([r["presence"][mi] if r.get("presence") is not None else np.full(len(mi), np.nan)
                                for r in records]),
          "present": np.stack([ex.presence()[di] for ex in examples]),
          "fov_mm": np.stack([np.full(3, np.nan) if r.get("fov_mm") is None else r["fov_mm"] for r in records])}


def _auc(absent: np.ndarray, present: np.ndarray) -> float | None:
  """Probability that a present landmark gets a higher presence than an absent one (ties count half)."""
  absent, present = absent[np.isfinite(absent)], present[np.isfinite(present)]
  if not len(absent) or not len(present):
    return None
  return round(float(np.mean((present[:, None] > absent[None]) + 0.5 * (present[:, None] == absent[None]))), 4)


def _share(hit: np.ndarray, of: np.ndarray) -> float | None:
  return round(float(np.mean(hit[of])), 4) if np.any(of) else None


def _quantiles(values) -> list | None:
  values = np.asarray(values)[np.isfinite(values)]
  return [round(float(q), 3) for q in np.quantile(values, [0.1, 0.5, 0.9])] if len(values) else None


def _pct(value) -> str:
  return "–" if value is None else f"{100 * value:.0f} %"


def table(all_results: dict) -> str:
  lines = ["| model | set | n | mean mm | median | p90 | max | flagged of > 3 mm | flagged of < 1.5 mm | absent "
           "called absent | present called absent | coverage (calibrated 90 %) |", "|" + "---|" * 12]
  for model, sets in all_results.items():
    for name, r in sets.items():
      o, q = r["overall"], r.get("qc", {})
      unc = r.get("uncertainty_calibrated") or r.get("uncertainty") or {}
      cells = [model, name, str(o["count"])]
      cells += [f"{o[k]:.2f}" for k in ("mean_mm", "median_mm", "p90_mm", "max_mm")] if o["count"] else ["–"] * 4
      cells += [f"{_pct(q.get('flagged_of_over_3mm'))} of {q.get('errors_over_3mm', 0)}",
                f"{_pct(q.get('flagged_of_under_1.5mm'))} of {q.get('errors_under_1.5mm', 0)}",
                f"{_pct(q.get('absent_recall'))} of {q.get('truly_absent', 0)}", _pct(q.get("false_absent_rate")),
                _pct(unc.get("coverage"))]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


DISPUTED_MM = 2.0  # raters' mean error above this: a landmark whose definition the experts themselves read apart
APART = ("RVOH", "LVOH")  # the ventral occipital horns: the 32-AFID issue reports them apart from the other 30


def landmark_table(model: str, sets: dict, raters: dict[str, np.ndarray]) -> str:
  """Per landmark: the model's mean / median / p90 on the test split, its mean on each stress set, each
  rater's mean error on the test split (own AFIDs against the consensus, moved like the cases) and their
  mean; "below raters" when the model's test mean is under the raters' mean; "disputed" when the raters'
  mean exceeds `DISPUTED_MM` (the experts disagree on where the landmark is)."""
  names = list(sets["test"]["per_landmark"])
  stress = [k for k in sets if k not in ("test", "val", "all stress sets")]
  head = (["landmark", "test mean", "median", "p90"] + [f"{k} mean" for k in stress] + list(raters)
          + ["raters' mean", "below raters", "disputed"])
  lines = [f"{model}: per landmark (mm)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  below, means = {}, {}
  for j, name in enumerate(names):
    t = sets["test"]["per_landmark"][name]
    cells = [name] + ([f"{t[k]:.2f}" for k in ("mean_mm", "median_mm", "p90_mm")] if t.get("count") else ["–"] * 3)
    for k in stress:
      r = sets[k]["per_landmark"].get(name, {})
      cells.append(f"{r['mean_mm']:.2f}" if r.get("count") else "–")
    rater_means = [float(np.mean(e[:, j])) for e in raters.values()]
    cells += [f"{m:.2f}" for m in rater_means]
    if t.get("count"):
      means[name] = (t["mean_mm"], t["count"])
    if rater_means and t.get("count"):
      mean = float(np.mean(rater_means))
      below[name] = t["mean_mm"] < mean
      cells += [f"{mean:.2f}", "yes" if below[name] else "no", "yes" if mean > DISPUTED_MM else ""]
    else:
      cells += ["–", "–", ""]
    lines.append("| " + " | ".join(cells) + " |")
  if below:
    lines += ["", f"below the raters' mean on {sum(below.values())} of {len(below)} landmarks"]
  apart = [name for name in APART if name in means]
  if apart and len(means) > len(apart):
    others = {name: v for name, v in means.items() if name not in apart}
    mean = sum(m * c for m, c in others.values()) / sum(c for _, c in others.values())
    lines += [f"test split without {' and '.join(apart)}: mean {mean:.2f} mm over {len(others)} landmarks"
              + (f", below the raters' mean on {sum(below[n] for n in others if n in below)} of "
                 f"{sum(n in below for n in others)}" if below else "")
              + "; " + ", ".join(f"{n} {means[n][0]:.2f} mm" for n in apart)]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="pretrained/afids6", help="comma-separated exported model folders")
  parser.add_argument("--afids", default="data/afids", help="the AFIDs benchmark (its test split is scored)")
  parser.add_argument("--stress", default="data/afids-stress", help="the stress sets' folder")
  parser.add_argument("--kinds", default="t2w,slab,deform,thick")
  parser.add_argument("--num-noise-samples", type=int, default=None, help="default: each model's eval config")
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--points", action="store_true", help="also score the AFIDs validation split and write "
                      "every set's per-point arrays to <out>/points_<model>.npz (benchmarks/qc_rules.py reads them)")
  parser.add_argument("--train", action="store_true", help="with --points, also the training split as it is "
                      "stored (no augmentation): how well the model fits its own cases (benchmarks/error_parts.py)")
  args = parser.parse_args()
  sets = _sets(args)
  if args.points:
    sets = {"val": (Path(args.afids) / "dataset.json", "val"), **sets}
  if args.points and args.train:
    sets = {"train": (Path(args.afids) / "dataset.json", "train"), **sets}
  all_results = {}
  Path(args.out).mkdir(parents=True, exist_ok=True)  # before the scoring: its minutes are not lost to a bad --out
  for folder in [Path(m) for m in args.models.split(",")]:
    points = {} if args.points else None
    results = score_model(folder, sets, num_samples=args.num_noise_samples, log=print, points=points)
    if points:
      np.savez_compressed(Path(args.out) / f"points_{folder.name}.npz",
                          **{f"{name}/{key}": value for name, arrays in points.items() for key, value in arrays.items()})
    name = folder.name if folder.name not in all_results else str(folder)
    all_results[name] = results
    path = Path(args.out) / f"stress_{folder.name}.json"
    path.write_text(json.dumps({k: {f: v for f, v in r.items() if f != "per_case"} for k, r in results.items()},
                               indent=1) + "\n")
  print(table(all_results))
  try:  # the human floor per landmark (an affine-only build with the raters' files)
    raters = afids.rater_errors(Path(args.afids), split="test")
  except (FileNotFoundError, ValueError) as error:
    raters = {}
    print(f"\nraters' errors not available: {error}")
  for model, results in all_results.items():
    print("\n" + landmark_table(model, results, raters))
  print(f"\nqc: {metrics.CONFIDENCE:.0%} ellipsoids; status thresholds from each model.json")


if __name__ == "__main__":
  main()
