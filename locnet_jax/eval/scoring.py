"""Scores predictions against the truth: radial errors, success rates, uncertainty figures (results.json),
and their readable table (results.md). Landmarks are matched by name: the model predicts its own, those
the data set also names are scored, no overlap is an error.
"""

from __future__ import annotations

import numpy as np

from locnet_jax.data import loader
from locnet_jax.eval import metrics, qc
from locnet_jax.from_config import ConfigError


def matched(model_names, data_names):
  """(scored names, model index, data index): the landmarks both have, matched by name."""
  scored = [n for n in model_names if n in data_names]
  if not scored:
    raise ConfigError(f"the model's landmarks {list(model_names)} and the data set's {list(data_names)} "
                                "share no name: nothing to score")
  return scored, [model_names.index(n) for n in scored], [data_names.index(n) for n in scored]


def calibration(predictions: list[dict], examples: list[loader.Example], *, model_names, data_names) -> float:
  """`metrics.calibration_scale` of the noise samples' std on these (held-out) cases."""
  _, mi, di = matched(model_names, data_names)
  truth = np.stack([ex.target_mm[di] for ex in examples])
  return metrics.calibration_scale(np.stack([p["mean_mm"][mi] for p in predictions]),
                                   np.stack([p["std_mm"][mi] for p in predictions]), truth)


def score(predictions: list[dict], examples: list[loader.Example], *, model_names, data_names,
          calibration: dict | None = None) -> dict:
  """results.json's content: overall, per landmark, per scale and per case figures (matched by name).

  `calibration` ({"split", "cases", "scale"}): the std scale fitted on held-out cases; with noise samples,
  results then also hold "uncertainty_calibrated" (coverage with std x scale; correlations do not change).
  """
  scored, mi, di = matched(model_names, data_names)
  truth = np.stack([ex.target_mm[di] for ex in examples])  # (C, L, 3)
  det = np.stack([p["pred_mm"][:, mi] for p in predictions])  # (C, S, L, 3)
  has_samples = predictions[0]["mean_mm"] is not None
  final = np.stack([p["mean_mm"][mi] for p in predictions]) if has_samples else det[:, -1]
  errors = metrics.radial_errors(final, truth)  # (C, L)
  results = {"landmarks": scored, "not_scored": [n for n in model_names if n not in data_names],
             "prediction": "mean of the noise samples" if has_samples else "deterministic pass",
             "overall": metrics.summarize_errors(errors),
             "per_scale": [metrics.summarize_errors(metrics.radial_errors(det[:, s], truth))
                           for s in range(det.shape[1])],
             "per_landmark": {n: metrics.summarize_errors(errors[:, j]) for j, n in enumerate(scored)},
             "seconds_per_case": float(np.median([p["seconds"] for p in predictions]))}
  per_case = []
  if has_samples:
    results["deterministic"] = metrics.summarize_errors(metrics.radial_errors(det[:, -1], truth))
    std = np.stack([p["std_mm"][mi] for p in predictions])  # (C, L, 3)
    inside = metrics.inside_ellipsoid(final, std, truth)
    results["uncertainty"] = metrics.summarize_uncertainty(errors, std, inside)
    for j, n in enumerate(scored):
      results["per_landmark"][n]["uncertainty"] = metrics.summarize_uncertainty(errors[:, j], std[:, j], inside[:, j])
    if calibration is not None:
      scaled = std * calibration["scale"]
      results["calibration"] = dict(calibration)
      results["uncertainty_calibrated"] = metrics.summarize_uncertainty(
          errors, scaled, metrics.inside_ellipsoid(final, scaled, truth))
  if "status" in predictions[0]:
    status = np.array([[p["status"][i] for i in mi] for p in predictions])  # (C, L)
    present = np.stack([ex.presence()[di] for ex in examples])
    results["qc"] = qc.summarize(errors.ravel(), status.ravel(), present.ravel())
    if predictions[0].get("presence") is not None:
      results["qc"]["presence_min_when_present"] = _min([p["presence"][mi] for p in predictions], present == 1)
  for c, (p, ex) in enumerate(zip(predictions, examples)):
    case = {"case_id": p["case_id"], "error_mm": _floats(errors[c]), "pred_mm": final[c].round(4).tolist()}
    if "status" in p:
      case["status"] = [p["status"][i] for i in mi]
    if p.get("presence") is not None:
      case["presence"] = _floats(p["presence"][mi])
    if has_samples:
      case.update(deterministic_mm=det[c, -1].round(4).tolist(), std_mm=std[c].round(4).tolist(), volume_mm3=_floats(metrics.confidence_volume_mm3(std[c])),
                  inside_90=[bool(v) for v in inside[c]])
    per_case.append(case)
  results["per_case"] = per_case
  return results


def _min(values, mask) -> float | None:
  values = np.asarray(values)[mask]
  return float(values.min()) if values.size else None


def _floats(values) -> list:
  return [None if not np.isfinite(v) else round(float(v), 4) for v in np.asarray(values).ravel()]


def results_markdown(results: dict, *, title: str) -> str:
  """A readable table of results.json: overall, per scale, per landmark."""
  def row(name, s, unc=None):
    cells = [name, str(s.get("count", 0))]
    if not s.get("count"):
      return "| " + " | ".join(cells + ["–"] * 8) + " |"
    cells += [f"{s['mean_mm']:.2f} ± {s['std_mm']:.2f}", f"{s['median_mm']:.2f}", f"{s['p90_mm']:.2f}",
              f"{s['max_mm']:.2f}", " / ".join(f"{100 * s[f'sdr_{r:g}mm']:.0f}" for r in metrics.SDR_RADII_MM)]
    if unc and "coverage" in unc:
      cells += [f"{unc['mean_volume_mm3']:.1f}", f"{100 * unc['coverage']:.0f} %",
                f"{unc['pearson_r']:.2f}" if "pearson_r" in unc else "–"]
    else:
      cells += ["–", "–", "–"]
    return "| " + " | ".join(cells) + " |"

  head = ("| | n | mean ± std mm | median | p90 | max | SDR 2 / 2.5 / 3 / 4 mm (%) | 90 % volume mm³ | coverage "
          "| Pearson r |\n|---|---|---|---|---|---|---|---|---|---|")
  lines = [f"# {title}", "", f"Prediction: {results['prediction']}. Radial error in mm; SDR = success detection "
           "rate; coverage = truths inside the 90 % confidence ellipsoid.", "", head,
           row("**all landmarks**", results["overall"], results.get("uncertainty"))]
  if "deterministic" in results:
    lines.append(row("without noise (one pass)", results["deterministic"]))
  for s, summary in enumerate(results["per_scale"]):
    lines.append(row(f"scale {s} (one pass)", summary))
  for name, summary in results["per_landmark"].items():
    lines.append(row(name, summary, summary.get("uncertainty")))
  unc = results.get("uncertainty", {})
  if "pearson_r" in unc:
    lines += ["", f"Confidence volume vs error: Pearson r = {unc['pearson_r']:.3f} (p = {unc['pearson_p']:.2g}), "
              f"Spearman rho = {unc['spearman_rho']:.3f} (p = {unc['spearman_p']:.2g}); coverage "
              f"{100 * unc['coverage']:.1f} % (nominal 90 %)."]
  if "uncertainty_calibrated" in results:
    cal = results["calibration"]
    lines += ["", f"Calibrated on the {cal['cases']} {cal['split']} cases (std x {cal['scale']:.2f}): coverage "
              f"{100 * results['uncertainty_calibrated']['coverage']:.1f} % (nominal 90 %)."]
  if "qc" in results:
    q = results["qc"]
    pct = lambda v: "–" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    lines += ["", f"QC: {q['ok']} ok, {q['uncertain']} uncertain, {q['absent']} absent of {q['points']} points; "
              f"flagged: {pct(q['flagged_of_over_3mm'])} of the {q['errors_over_3mm']} errors > 3 mm, "
              f"{pct(q['flagged_of_under_1.5mm'])} of the {q['errors_under_1.5mm']} errors < 1.5 mm; absent landmarks "
              f"called absent: {pct(q['absent_recall'])} of {q['truly_absent']}; present ones called absent: "
              f"{pct(q['false_absent_rate'])}."]
  if results["not_scored"]:
    lines += ["", f"Predicted but not in the data set (not scored): {', '.join(results['not_scored'])}."]
  return "\n".join(lines) + "\n"
