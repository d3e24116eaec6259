"""The evaluation's figures (PNG, matplotlib, written atomically): the paper's Fig. 3 (slices through each
landmark with truth, prediction and heatmap), Fig. 4 (error distributions, violins) and Fig. 5
(confidence volume against error)."""

from __future__ import annotations

import io as _io
from pathlib import Path

import jax
import numpy as np

from locnet_jax import geometry, io
from locnet_jax.data import loader
from locnet_jax.model import ops

_PLANES = (("sagittal (x)", 0), ("coronal (y)", 1), ("axial (z)", 2))


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: Path) -> None:
  buffer = _io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  _pyplot().close(fig)
  io.atomic_write(path, buffer.getvalue())


def case_slices(model, params, example: loader.Example, *, names, data_names, prediction: dict) -> list[dict]:
  """Per predicted landmark: the finest-scale input (a patch, or the whole volume for single-volume models),
  its heatmap, and truth / prediction in that array's voxels: {"name", "image", "heatmap", "truth_vox",
  "pred_vox"} (truth_vox None where the data set has no such landmark or it is missing)."""
  batch = loader.collate([example])
  out, state = model.apply({"params": params}, batch["volumes"], batch["affines"], mutable="intermediates")
  last = len(batch["volumes"]) - 1
  volume, affine = np.asarray(batch["volumes"][last][0]), np.asarray(batch["affines"][last][0])
  point = prediction["mean_mm"] if prediction["mean_mm"] is not None else prediction["pred_mm"][-1]
  sown = state.get("intermediates", {}).get(f"heatmap{last}")
  heat = np.asarray(sown[0][0]) if sown is not None else np.asarray(out["heatmap"][0])
  rows = []
  for k, name in enumerate(names):
    truth = example.target_mm[list(data_names).index(name)] if name in data_names else np.full(3, np.nan)
    if last > 0:  # a patch of the finest volume around the centre the model cropped at
      center_vox = geometry.mm_to_vox(np.asarray(out["center_mm"][0, last, k], np.float64), affine)
      patch_shape = heat.shape[1:]
      image = np.asarray(ops.crop_patch(jax.numpy.asarray(volume), center_vox, shape=patch_shape))
      origin = center_vox - (np.asarray(patch_shape) - 1) / 2
      heatmap = heat[k]
    else:
      image, origin, heatmap = volume, np.zeros(3), heat[..., k]
    to_local = lambda p: None if not np.all(np.isfinite(p)) else geometry.mm_to_vox(np.asarray(p, np.float64), affine) - origin  # noqa: E731
    rows.append({"name": name, "image": image, "heatmap": heatmap, "truth_vox": to_local(truth),
                 "pred_vox": to_local(point[k])})
  return rows


def save_slices(path: Path, rows: list[dict], *, title: str) -> None:
  """Fig. 3: one row per landmark, three orthogonal slices through the prediction; truth '+', prediction 'x'."""
  plt = _pyplot()
  fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False, layout="constrained")
  for r, row in enumerate(rows):
    image, heat, pred = row["image"], np.maximum(row["heatmap"], 0), row["pred_vox"]
    at = np.clip(np.round(pred).astype(int), 0, np.asarray(image.shape) - 1)
    for c, (label, axis) in enumerate(_PLANES):
      ax = axes[r, c]
      other = [a for a in range(3) if a != axis]
      take = lambda a: np.take(a, at[axis], axis=axis).T  # noqa: E731  rows = second remaining axis
      ax.imshow(take(image), cmap="gray", origin="lower")
      h = take(heat)
      if h.max() > 0:
        ax.imshow(np.ma.masked_less_equal(h, 0.05 * h.max()), cmap="inferno", alpha=0.45, origin="lower")
      ax.plot(pred[other[0]], pred[other[1]], "x", color="red", markersize=9, mew=2)
      if row["truth_vox"] is not None:
        ax.plot(row["truth_vox"][other[0]], row["truth_vox"][other[1]], "+", color="lime", markersize=11, mew=2)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f"{row['name']}: {label}", fontsize=9)
  fig.suptitle(title, fontsize=10)
  _save(fig, path)


def save_violin(path: Path, errors_by_run: dict[str, list[float]]) -> None:
  """Fig. 4: radial error distributions of one or several runs."""
  plt = _pyplot()
  names = [n for n, e in errors_by_run.items() if len(e)]
  fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4))
  ax.violinplot([errors_by_run[n] for n in names], showmedians=True, showmeans=False)
  ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
  ax.set_ylabel("radial error (mm)")
  ax.set_title("error distribution per run (all landmarks, all cases)")
  ax.grid(axis="y", alpha=0.3)
  _save(fig, path)


def save_confidence_vs_error(path: Path, results: dict) -> None:
  """Fig. 5: 90 % confidence-ellipsoid volume against radial error, with the correlation and coverage."""
  plt = _pyplot()
  volume, error, inside = [], [], []
  for case in results["per_case"]:
    for v, e, i in zip(case["volume_mm3"], case["error_mm"], case["inside_90"]):
      if e is not None and v is not None:
        volume.append(v), error.append(e), inside.append(i)
  volume, error, inside = map(np.asarray, (volume, error, inside))
  unc = results["uncertainty"]
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.scatter(volume[inside], error[inside], s=14, label="truth inside the 90 % ellipsoid")
  ax.scatter(volume[~inside], error[~inside], s=14, marker="^", label="outside")
  ax.set_xlabel("90 % confidence volume (mm³)")
  ax.set_ylabel("radial error (mm)")
  r = f"Pearson r = {unc['pearson_r']:.2f} (p = {unc['pearson_p']:.1g})" if "pearson_r" in unc else "r: n/a"
  calibrated = results.get("uncertainty_calibrated", {})
  extra = f" (calibrated on {results['calibration']['split']}: {100 * calibrated['coverage']:.0f} %)" if calibrated else ""
  ax.set_title(f"{r}, coverage {100 * unc['coverage']:.0f} %{extra}", fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save(fig, path)
