"""Predictions of a trained model on cases: the deterministic pass, the 50-pass uncertainty, and the files
users open (3D Slicer `.mrk.json` and CSV, RAS mm in the world of the case's original image).

Outputs follow `outputs.py`: the folder is checked before any work (never a file, never one holding an
input or a model folder), and only the files of the predicted cases are written, each atomically.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from locnet_jax import from_config, io, outputs
from locnet_jax.data import loader
from locnet_jax.eval import metrics, qc, restore
from locnet_jax.eval.restore import Trained
from locnet_jax.model import inference
from locnet_jax.model.locnet import MultiScaleLocNet


def predict_cases(trained: Trained, examples: list[loader.Example], *, num_samples: int, chunk_size: int,
                  seed: int) -> list[dict]:
  """Per case: {"case_id", "names" (K,) the model's landmarks, "pred_mm" (S, K, 3), "mean_mm"/"std_mm" (K, 3) or None, "presence" (K,)
  probability or None (a model without a presence output), "seconds"}."""
  predict = inference.make_forward(trained.model)
  uncertain = isinstance(trained.model, MultiScaleLocNet) and trained.model.num_scales >= 2 and num_samples > 0
  sample = inference.make_uncertainty(trained.model, num_samples=num_samples, chunk_size=chunk_size) if uncertain else None
  out = []
  for i, example in enumerate(examples):
    batch = loader.collate([example])
    start = time.perf_counter()
    if sample is not None:
      result = jax.device_get(sample(trained.params, batch["volumes"], batch["affines"],
                                     jax.random.fold_in(jax.random.key(seed), i)))
      pred = np.array(result["pred_mm"][0])
      pred[-1] = result["deterministic_mm"][0]
      mean, std = np.asarray(result["pred_mm"][0, -1]), np.asarray(result["std_mm"][0])
    else:
      result = jax.device_get(predict(trained.params, batch["volumes"], batch["affines"]))
      pred, mean, std = np.asarray(result["pred_mm"][0]), None, None
    presence = None
    if "presence_logit" in result:
      presence = 1.0 / (1.0 + np.exp(-np.asarray(result["presence_logit"][0], np.float64)))
    out.append({"case_id": example.case_id, "names": trained.names, "pred_mm": pred, "mean_mm": mean, "std_mm": std,
                "presence": presence, "seconds": time.perf_counter() - start})
  return out


def prediction_rows(predictions: list[dict], names) -> list[dict]:
  """Rows of the predictions CSV (docs/data_format.md): every landmark the model predicts, RAS mm; with
  `qc.annotate`d records, the calibrated uncertainty, presence and status (an absent landmark: no x, y, z)."""
  rows = []
  for p in predictions:
    point = _point(p)
    std_all = p.get("std_calibrated_mm", p["std_mm"])
    for k, name in enumerate(names):
      row = {"case_id": p["case_id"], "label": name, "x": point[k, 0], "y": point[k, 1], "z": point[k, 2]}
      if std_all is not None:
        std = std_all[k]
        row.update(std_x=std[0], std_y=std[1], std_z=std[2],
                   confidence_volume_mm3=float(metrics.confidence_volume_mm3(std)))
      if p.get("presence") is not None:
        row["presence"] = round(float(p["presence"][k]), 4)
      if "status" in p:
        row["status"] = p["status"][k]
      rows.append(row)
  return rows


def _point(prediction: dict) -> np.ndarray:
  """The reported point per landmark (K, 3) RAS mm: the mean of the noise samples (else the deterministic
  finest prediction); NaN for a landmark QC calls absent."""
  point = np.array(prediction["mean_mm"] if prediction["mean_mm"] is not None else prediction["pred_mm"][-1])
  absent = np.array([s == "absent" for s in prediction.get("status", [])], bool)
  if absent.any():
    point[absent] = np.nan
  return point


def write_predictions(folder: Path, predictions: list[dict], names) -> None:
  """`<case>.mrk.json` (opens in 3D Slicer over the original image; an absent landmark is an unplaced point,
  each point's status in its description) and `<case>.csv` per case, and all in `predictions.csv`."""
  folder.mkdir(parents=True, exist_ok=True)
  rows = prediction_rows(predictions, names)
  for p in predictions:
    status = p.get("status")
    descriptions = None if status is None else [f"status={s}" for s in status]
    unplaced = [] if status is None else [n for n, s in zip(names, status) if s == "absent"]
    io.write_mrk_json(folder / f"{p['case_id']}.mrk.json", list(names), _point(p), coordinate_system="LPS",
                      descriptions=descriptions, unplaced=unplaced)
    io.write_predictions_csv(folder / f"{p['case_id']}.csv", [r for r in rows if r["case_id"] == p["case_id"]])
  io.write_predictions_csv(folder / "predictions.csv", rows)


def warnings(predictions: list[dict]) -> list[str]:
  """One line per case with any landmark not "ok": which are uncertain and which absent."""
  lines = []
  for p in predictions:
    groups = {s: [n for n, t in zip(p["names"], p.get("status", [])) if t == s] for s in ("uncertain", "absent")}
    parts = [f"{s}: {', '.join(g)}" for s, g in groups.items() if g]
    if parts:
      lines.append(f"warning: {p['case_id']}: " + "; ".join(parts))
  return lines


def predict_images(workdir: Path, images: list, out: Path, *, num_samples: int | None = None) -> list[dict]:
  """Predicts the landmarks of NIfTI `images` (no ground truth) with the model in `workdir` (a training
  run's best checkpoint or an exported model folder, which carries its own config) and writes them to the
  folder `out` (`write_predictions`; `outputs.py` rules). `num_samples`: noise samples (None: the
  model's eval config). Returns `predict_cases`' records with QC (`qc.annotate`, thresholds from the model
  folder: calibrated uncertainty, status); a case is named by its file name without `.nii.gz` / `.nii`
  (`outputs.case_ids_from_paths`: two images with one name are an error)."""
  workdir = Path(workdir)
  if not images:
    raise io.DataError(out, "no images given")
  if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 0):
    raise from_config.ConfigError(f"num_noise_samples={num_samples!r}: an int >= 0")
  outputs.check_output_folder(out, inputs=images, runs=[workdir])
  ids = outputs.case_ids_from_paths(images)
  config = restore.saved_config(workdir)
  settings = from_config.preprocess_settings(config.data)
  examples = []
  for case_id, image in zip(ids, images):
    pyramid = loader.compute_pyramid(Path(image), settings)
    examples.append(loader.Example(case_id, pyramid, np.zeros((0, 3))))  # no ground truth
  trained = restore.restore(config, workdir, example=examples[0])
  samples = config.eval.num_noise_samples if num_samples is None else num_samples
  predictions = predict_cases(trained, examples, num_samples=samples, chunk_size=config.eval.chunk_size,
                              seed=config.seed)
  checks = qc.load(workdir)
  predictions = [qc.annotate(p, checks) for p in predictions]
  write_predictions(outputs.prepare_output_folder(out, inputs=images, runs=[workdir]), predictions, trained.names)
  return predictions
