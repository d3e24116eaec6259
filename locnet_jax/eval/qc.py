"""Quality control per predicted landmark: `ok`, `uncertain` or `absent`, from its presence in the image and
the model's calibrated test-time uncertainty, with thresholds fitted on held-out data and stored with the model.

Presence is read against the image's own field of view (`presence`): the probability that a landmark is
in the image is ``sigmoid(depth_mm / PRESENCE_SOFTNESS_MM)``, where ``depth_mm`` is how deep scale
`PRESENCE_SCALE`'s prediction lies inside the image's voxel grid (`geometry.depth_in_grid_mm`: negative
outside), times the model's learnt presence output where it has one. Why: a model trained on field-of-view
crops learns where a cut-away landmark lies beyond the image's edge (the augmentation keeps its position
as a target), so a prediction outside the grid says the landmark is not in the image. Of the learnt
outputs, the heatmaps' mass (`model.presence.Presence`) carried no signal and a classifier of the coarsest
volume (`model.presence.PresenceEncoder`) tells partial images from whole heads, not which landmarks a slab
holds (docs/results.md, "Presence").

- absent: presence probability below `absent_below` (the landmark is not in the image: no coordinates), or,
  in a partial image (field of view shorter than `partial_fov_mm` along one of its voxel axes), a landmark
  that would be `uncertain`;
- uncertain: presence below `uncertain_below`, or the largest semi-axis of the calibrated 90 % confidence
  ellipsoid (`radius_mm`) above `max_radius_mm`;
- ok: otherwise.

`max_radius_mm` is the `RADIUS_QUANTILE` quantile of `radius_mm` over the held-out points the model gets
right (error below `GOOD_MM`): in data like the held-out set, about 1 - quantile of the good points are
flagged; points whose ellipsoid grows beyond anything seen on good held-out predictions (another contrast,
an anatomy the model cannot read) are. Without noise samples only presence decides.

`partial_fov_mm` is `PARTIAL_FRACTION` of the shortest field of view among the held-out images: an image
shorter than half of anything the model was checked on along some axis cannot hold what it learnt to read
(for the AFIDs, a whole head: 193 mm, so 96.5 mm). Why absent rather than uncertain there: a model that
cannot localise a landmark in a slab is, far more often than not, looking for one the slab does not hold,
and its guess lies on the slab's edge; measured on the AFIDs stress sets (docs/results.md, "The shipped
real-scan model"), this calls every landmark outside the slabs absent and no landmark of a whole head, where the
field-of-view rule alone found 8 % of them. The price: in a slab, a present landmark the model is unsure
of is reported absent too (no coordinates instead of a wrong point).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from locnet_jax import geometry
from locnet_jax.eval import metrics

STATUSES = ("ok", "uncertain", "absent")
GOOD_MM = 1.5  # a held-out prediction closer than this is "right" when fitting the radius threshold
RADIUS_QUANTILE = 0.98
ABSENT_BELOW = 0.5
UNCERTAIN_BELOW = 0.9
PRESENCE_SCALE = 0  # whose prediction is checked against the field of view: the coarsest sees the whole grid
PARTIAL_FRACTION = 0.5  # an image is partial below this fraction of the held-out images' shortest field of view
PRESENCE_SOFTNESS_MM = 1.0  # presence 0.5 on the image's edge, 0.9 at 2.2 mm inside, 0.1 at 2.2 mm outside
QC_FILE = "qc.json"  # in a training workdir, written by evaluation when it fits the thresholds


def radius_mm(std_mm: np.ndarray, scale: float = 1.0) -> np.ndarray:
  """(..., 3) per-axis std -> (...) largest semi-axis (mm) of the 90 % ellipsoid of std x `scale`."""
  return scale * np.max(std_mm, axis=-1) * np.sqrt(metrics.CHI2_3)


def field_of_view_mm(grid) -> np.ndarray | None:
  """(3,) mm an image's voxel grid spans along each voxel axis (`grid`: its voxel->RAS affine and shape;
  None: unknown -> None)."""
  if grid is None:
    return None
  return geometry.voxel_spacing_mm(np.asarray(grid[0], np.float64)) * np.asarray(grid[1], np.float64)


def presence(pred_mm: np.ndarray, grid, learnt: np.ndarray | None = None) -> np.ndarray | None:
  """(K,) probability that each landmark is in the image (module docstring): scale `PRESENCE_SCALE`'s
  prediction of `pred_mm` (S, K, 3) RAS mm against `grid` (the image's voxel->RAS affine, shape; None:
  unknown, then only `learnt`), times `learnt` (K,) where given; None when neither is known."""
  if grid is None:
    return learnt
  depth = geometry.depth_in_grid_mm(np.asarray(pred_mm, np.float64)[PRESENCE_SCALE], *grid)
  inside = 1.0 / (1.0 + np.exp(-np.clip(depth / PRESENCE_SOFTNESS_MM, -50.0, 50.0)))
  return inside if learnt is None else inside * np.asarray(learnt, np.float64)


def fit(predictions: list[dict], truth_mm: np.ndarray, *, model_index, calibration_scale: float | None,
        split: str) -> dict:
  """QC thresholds from held-out predictions (`predict.predict_cases` records) and their truths (C, L, 3)
  (L landmarks at `model_index` in the model's order)."""
  fov = [p["fov_mm"] for p in predictions if p.get("fov_mm") is not None]
  qc = {"absent_below": ABSENT_BELOW, "uncertain_below": UNCERTAIN_BELOW, "calibration_scale": calibration_scale,
        "max_radius_mm": None,
        "partial_fov_mm": round(PARTIAL_FRACTION * float(np.min(fov)), 4) if fov else None,
        "fitted_on": {"split": split, "cases": len(predictions), "good_mm": GOOD_MM, "quantile": RADIUS_QUANTILE}}
  if predictions[0]["std_mm"] is None or calibration_scale is None:
    return qc
  final = np.stack([p["mean_mm"][model_index] for p in predictions])
  radius = radius_mm(np.stack([p["std_mm"][model_index] for p in predictions]), calibration_scale)
  good = metrics.radial_errors(final, truth_mm) < GOOD_MM
  if np.any(good):
    qc["max_radius_mm"] = round(float(np.quantile(radius[good], RADIUS_QUANTILE)), 4)
  return qc


def statuses(*, count: int, presence: np.ndarray | None, radius: np.ndarray | None, qc: dict | None,
             fov_mm: np.ndarray | None = None) -> list[str]:
  """Per landmark (`count`,): "ok", "uncertain" or "absent" (module docstring; `fov_mm` (3,) the image's
  field of view, None unknown); all "ok" without QC."""
  if qc is None:
    return ["ok"] * count
  partial = (fov_mm is not None and qc.get("partial_fov_mm") is not None
             and float(np.min(fov_mm)) < qc["partial_fov_mm"])
  out = []
  for k in range(count):
    p = None if presence is None else float(presence[k])
    if p is not None and p < qc["absent_below"]:
      out.append("absent")
    elif (p is not None and p < qc["uncertain_below"]) or (
        radius is not None and qc.get("max_radius_mm") is not None and radius[k] > qc["max_radius_mm"]):
      out.append("absent" if partial else "uncertain")
    else:
      out.append("ok")
  return out


def annotate(prediction: dict, qc: dict | None) -> dict:
  """A `predict_cases` record with "std_calibrated_mm" (K, 3) or None, "radius_mm" (K,) or None and
  "status" (K,) added."""
  std = prediction["std_mm"]
  scale = (qc or {}).get("calibration_scale") or 1.0
  calibrated = None if std is None else np.asarray(std) * scale
  radius = None if std is None else radius_mm(np.asarray(std), scale)
  return {**prediction, "std_calibrated_mm": calibrated, "radius_mm": radius,
          "status": statuses(count=prediction["pred_mm"].shape[-2], presence=prediction.get("presence"),
                             radius=radius, qc=qc, fov_mm=prediction.get("fov_mm"))}


def calibration(checks: dict | None) -> dict | None:
  """The uncertainty calibration QC thresholds carry, as `scoring.score` takes it ({"split", "cases",
  "scale"}), or None."""
  if not checks or not checks.get("calibration_scale"):
    return None
  return {"split": checks["fitted_on"]["split"], "cases": checks["fitted_on"]["cases"],
          "scale": checks["calibration_scale"]}


def load(folder: Path) -> dict | None:
  """The QC a model folder carries: an exported model's `model.json` "qc", or a workdir's `qc.json`."""
  folder = Path(folder)
  card = folder / "model.json"
  if card.is_file():
    return json.loads(card.read_text()).get("qc")
  path = folder / QC_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def summarize(errors_mm: np.ndarray, status: np.ndarray, present: np.ndarray) -> dict:
  """QC figures over points: errors (N,) mm (NaN if unscored), status (N,) strings, truth presence (N,)
  (1 in the image, 0 absent, NaN unknown)."""
  flagged = status != "ok"
  called_absent = status == "absent"
  scored = np.isfinite(errors_mm)
  bad, good = scored & (errors_mm > 3.0), scored & (errors_mm < GOOD_MM)
  out = {"points": int(len(status)), **{s: int(np.sum(status == s)) for s in STATUSES},
         "errors_over_3mm": int(np.sum(bad)), "flagged_of_over_3mm": _fraction(flagged, bad),
         "errors_under_1.5mm": int(np.sum(good)), "flagged_of_under_1.5mm": _fraction(flagged, good)}
  truly_absent, truly_present = present == 0, present == 1
  out.update(truly_absent=int(np.sum(truly_absent)), absent_recall=_fraction(called_absent, truly_absent),
             false_absent_rate=_fraction(called_absent, truly_present))
  return out


def _fraction(hit: np.ndarray, of: np.ndarray) -> float | None:
  return float(np.sum(hit & of) / np.sum(of)) if np.any(of) else None
