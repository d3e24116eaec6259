"""Evaluation and prediction behind `evaluate.py` and `predict.py`: a trained run's checkpoint on a data set.

For every case: the deterministic prediction of every scale and, for a multi-scale Loc-Net, the test-time
uncertainty (`inference.make_uncertainty`: N noise samples of the finest scale in one jitted call; the
prediction is their mean). Landmarks are matched by name: the model predicts its own landmarks, those the
data set also names are scored, no overlap is an error. Predictions are RAS mm in the world frame of the
case's original image (the pyramid is resampled in that world, so no conversion is needed).

Outputs go to a fresh folder that replaces the old one only when complete (`replace_folder`): a crash
leaves the previous results untouched, and old and new files never mix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from locnet_jax import checkpoints as checkpoints_lib
from locnet_jax import figures, inference, io, metrics, pipeline, train_lib, training
from locnet_jax.models import MultiScaleLocNet


@dataclasses.dataclass
class Trained:
  """A restored model: the module, its parameters, the landmark names it predicts, its checkpoint."""

  model: Any
  params: Any
  names: tuple[str, ...]
  checkpoint: Path
  meta: dict


def model_landmarks(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The landmark names a run trained on, from its data config (checkpoints also store them)."""
  if data_config.source == "synthetic":
    return tuple(f"L{k}" for k in range(data_config.num_landmarks))
  if data_config.source == "afids":
    manifest = Path(data_config.afids_dir) / "dataset.json"
    if not manifest.is_file():
      return tuple(n.strip() for n in data_config.afids_landmarks.split(","))
    return io.load_manifest(manifest).landmarks
  return io.load_manifest(data_config.manifest).landmarks


def restore(config: ml_collections.ConfigDict, workdir: Path, *, example: pipeline.Example,
            which: str = "best") -> Trained:
  """The run's best (or latest) checkpoint, or an exported model folder, with the model its config describes."""
  if checkpoints_lib.is_exported(workdir):
    card = json.loads((Path(workdir) / checkpoints_lib.EXPORT_META).read_text())
    names = tuple(card["landmarks"])
    model = train_lib.create_model(config.model, num_landmarks=len(names), num_scales=len(config.data.spacings_mm))
    batch = pipeline.collate([example])
    params, card = checkpoints_lib.load_exported(
        workdir, model.init(jax.random.key(0), batch["volumes"], batch["affines"])["params"])
    return Trained(model, params, names, Path(workdir) / checkpoints_lib.EXPORT_PARAMS, card)
  with checkpoints_lib.Checkpoints(Path(workdir) / "checkpoints") as checkpoints:
    meta = checkpoints.read_meta(best=which == "best")
    if meta is None:
      raise io.DataError(workdir, f"no {which} checkpoint: train first (python train.py --workdir={workdir} ...)")
    names = tuple(meta.get("landmarks") or model_landmarks(ml_collections.ConfigDict(meta["config"]["data"])))
    model = train_lib.create_model(config.model, num_landmarks=len(names), num_scales=len(config.data.spacings_mm))
    batch = pipeline.collate([example])
    state = training.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                        affines=batch["affines"], learning_rate=config.train.learning_rate)
    restored = checkpoints.restore_best(state) if which == "best" else checkpoints.restore_latest(state)
    path = checkpoints.best_path() if which == "best" else checkpoints.latest_path()
  return Trained(model, restored.state.params, names, path, meta)


def export(config: ml_collections.ConfigDict, workdir: Path, out: Path, *, example: pipeline.Example,
           notes: str = "") -> dict:
  """Writes the run's best parameters and a model card (config, landmarks, provenance, measured errors)."""
  trained = restore(config, workdir, example=example)
  records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  results_path = Path(workdir) / "eval" / "test" / "results.json"
  results = json.loads(results_path.read_text()) if results_path.is_file() else None
  card = {"landmarks": list(trained.names), "config": json.loads(config.to_json_best_effort()),
          "checkpoint": str(trained.checkpoint), "best_epoch": trained.meta.get("best_epoch"),
          "best_val_error_mm": trained.meta.get("best_val_error_mm"), "epochs": len(records),
          "training_seconds": round(sum(r["epoch_s"] for r in records), 1),
          "trained_on": jax.devices()[0].device_kind, "jax": jax.__version__,
          "test": None if results is None else {"data": results["data"], "split": results["split"],
                                                 "overall": results["overall"],
                                                 "uncertainty": results.get("uncertainty")},
          "notes": notes}
  checkpoints_lib.export_model(out, trained.params, card)
  return card


INFERENCE_FREE = ("model.unet.dtype",)  # may differ from training when evaluating (bfloat16 on a GPU, say)


def check_model_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """The config's model and pyramid must be the ones the run was trained with (but `INFERENCE_FREE`)."""
  saved_path = Path(workdir) / "config.json"
  if not saved_path.is_file():
    raise io.DataError(saved_path, "no such file: is this a training workdir?")
  saved = json.loads(saved_path.read_text())
  differences = train_lib.config_differences(saved, json.loads(config.to_json_best_effort()), prefixes=(
      "model.", "data.spacings_mm", "data.finest_size", "data.intensity", "data.ct_window_hu"), also_free=INFERENCE_FREE)
  if differences:
    raise train_lib.ConfigError(f"{workdir} was trained with another model or pyramid ({'; '.join(differences)}): "
                                "pass the training config (and overrides) with --config")


def replace_folder(final: Path, write) -> None:
  """Calls `write(tmp_folder)`, then swaps the finished folder in for `final` (old contents removed)."""
  final = Path(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if final.exists():
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
    os.replace(final, old / final.name)
  os.replace(tmp, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def predict_cases(trained: Trained, examples: list[pipeline.Example], *, num_samples: int, chunk_size: int,
                  seed: int) -> list[dict]:
  """Per case: {"case_id", "pred_mm" (S, K, 3), "mean_mm"/"std_mm" (K, 3) or None, "seconds"}."""
  predict = inference.make_predict(trained.model)
  uncertain = isinstance(trained.model, MultiScaleLocNet) and trained.model.num_scales >= 2 and num_samples > 0
  sample = inference.make_uncertainty(trained.model, num_samples=num_samples, chunk_size=chunk_size) if uncertain else None
  out = []
  for i, example in enumerate(examples):
    batch = pipeline.collate([example])
    start = time.perf_counter()
    if sample is not None:
      result = jax.device_get(sample(trained.params, batch["volumes"], batch["affines"],
                                     jax.random.fold_in(jax.random.key(seed), i)))
      pred = np.array(result["pred_mm"][0])
      pred[-1] = result["deterministic_mm"][0]
      mean, std = np.asarray(result["pred_mm"][0, -1]), np.asarray(result["std_mm"][0])
    else:
      pred = np.asarray(jax.device_get(predict(trained.params, batch["volumes"], batch["affines"]))[0])
      mean, std = None, None
    out.append({"case_id": example.case_id, "pred_mm": pred, "mean_mm": mean, "std_mm": std,
                "seconds": time.perf_counter() - start})
  return out


def _matched(predictions: list[dict], examples: list[pipeline.Example], *, model_names, data_names):
  """(scored names, model index, data index): the landmarks both have, matched by name."""
  scored = [n for n in model_names if n in data_names]
  if not scored:
    raise train_lib.ConfigError(f"the model's landmarks {list(model_names)} and the data set's {list(data_names)} "
                                "share no name: nothing to score")
  return scored, [model_names.index(n) for n in scored], [data_names.index(n) for n in scored]


def calibration(predictions: list[dict], examples: list[pipeline.Example], *, model_names, data_names) -> float:
  """`metrics.calibration_scale` of the noise samples' std on these (held-out) cases."""
  _, mi, di = _matched(predictions, examples, model_names=model_names, data_names=data_names)
  truth = np.stack([ex.target_mm[di] for ex in examples])
  return metrics.calibration_scale(np.stack([p["mean_mm"][mi] for p in predictions]),
                                   np.stack([p["std_mm"][mi] for p in predictions]), truth)


def score(predictions: list[dict], examples: list[pipeline.Example], *, model_names, data_names,
          calibration: dict | None = None) -> dict:
  """results.json's content: overall, per landmark, per scale and per case figures (matched by name).

  `calibration` ({"split", "cases", "scale"}): the std scale fitted on held-out cases; with noise samples,
  results then also hold "uncertainty_calibrated" (coverage with std x scale; correlations do not change).
  """
  scored, mi, di = _matched(predictions, examples, model_names=model_names, data_names=data_names)
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
  for c, (p, ex) in enumerate(zip(predictions, examples)):
    case = {"case_id": p["case_id"], "error_mm": _floats(errors[c]), "pred_mm": final[c].round(4).tolist()}
    if has_samples:
      case.update(deterministic_mm=det[c, -1].round(4).tolist(), std_mm=std[c].round(4).tolist(), volume_mm3=_floats(metrics.confidence_volume_mm3(std[c])),
                  inside_90=[bool(v) for v in inside[c]])
    per_case.append(case)
  results["per_case"] = per_case
  return results


def _floats(values) -> list:
  return [None if not np.isfinite(v) else round(float(v), 4) for v in np.asarray(values).ravel()]


def prediction_rows(predictions: list[dict], names) -> list[dict]:
  """Rows of the predictions CSV (DATA_FORMAT.md): every landmark the model predicts, RAS mm."""
  rows = []
  for p in predictions:
    point = p["mean_mm"] if p["mean_mm"] is not None else p["pred_mm"][-1]
    for k, name in enumerate(names):
      row = {"case_id": p["case_id"], "label": name, "x": point[k, 0], "y": point[k, 1], "z": point[k, 2]}
      if p["std_mm"] is not None:
        std = p["std_mm"][k]
        row.update(std_x=std[0], std_y=std[1], std_z=std[2],
                   confidence_volume_mm3=float(metrics.confidence_volume_mm3(std)))
      rows.append(row)
  return rows


def write_predictions(folder: Path, predictions: list[dict], names) -> None:
  """`<case>.mrk.json` (opens in 3D Slicer over the original image) and `<case>.csv` per case, and all in
  `predictions.csv`."""
  folder.mkdir(parents=True, exist_ok=True)
  rows = prediction_rows(predictions, names)
  for p in predictions:
    point = p["mean_mm"] if p["mean_mm"] is not None else p["pred_mm"][-1]
    io.write_mrk_json(folder / f"{p['case_id']}.mrk.json", list(names), point, coordinate_system="LPS")
    io.write_predictions_csv(folder / f"{p['case_id']}.csv", [r for r in rows if r["case_id"] == p["case_id"]])
  io.write_predictions_csv(folder / "predictions.csv", rows)


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
  if results["not_scored"]:
    lines += ["", f"Predicted but not in the data set (not scored): {', '.join(results['not_scored'])}."]
  return "\n".join(lines) + "\n"


def _load_split(manifest: io.Manifest, split: str, settings, cache: Path) -> list[pipeline.Example]:
  """The examples of one split, their pyramids cached first (in parallel)."""
  cases = manifest.split(split)
  pipeline.prepare_cases(cases, manifest.landmarks, settings, cache, workers=train_lib.cpu_workers())
  return [pipeline.load_example(c, manifest.landmarks, settings, cache, check=False) for c in cases]


def evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, log=print) -> Path:
  """Scores the run in `workdir` on `config.eval.split` of `config.data`; returns the output folder."""
  workdir = Path(workdir)
  check_model_config(config, workdir)
  manifest = io.load_manifest(train_lib.manifest_path(config.data, seed=config.seed, log=log))
  settings = train_lib.preprocess_settings(config.data)
  cache = Path(config.data.cache_dir) if config.data.cache_dir else manifest.path.parent / ".locnet_cache"
  examples = _load_split(manifest, config.eval.split, settings, cache)
  trained = restore(config, workdir, example=examples[0], which=config.eval.checkpoint)
  log(f"evaluating {trained.checkpoint} on {len(examples)} {config.eval.split} cases of {manifest.path}")
  predictions = predict_cases(trained, examples, num_samples=config.eval.num_noise_samples,
                              chunk_size=config.eval.chunk_size, seed=config.seed)
  fitted = None
  split = config.eval.calibrate_split
  if (predictions[0]["std_mm"] is not None and split and split != config.eval.split
      and any(c.split == split for c in manifest.cases)):
    held_out = _load_split(manifest, split, settings, cache)
    log(f"calibrating the uncertainty on {len(held_out)} {split} cases")
    scale = calibration(predict_cases(trained, held_out, num_samples=config.eval.num_noise_samples,
                                      chunk_size=config.eval.chunk_size, seed=config.seed + 1),
                        held_out, model_names=trained.names, data_names=manifest.landmarks)
    fitted = {"split": split, "cases": len(held_out), "scale": scale}
  results = score(predictions, examples, model_names=trained.names, data_names=manifest.landmarks,
                  calibration=fitted)
  results.update(checkpoint=str(trained.checkpoint), data=str(manifest.path), split=config.eval.split,
                 num_noise_samples=config.eval.num_noise_samples, device=jax.devices()[0].device_kind)
  out = Path(config.eval.out_dir) if config.eval.out_dir else workdir / "eval" / config.eval.split
  title = f"{workdir.name} on {manifest.path.parent.name} ({config.eval.split}, {len(examples)} cases)"

  def write(folder: Path) -> None:
    io.atomic_write(folder / "results.json", json.dumps(results, indent=1) + "\n")
    io.atomic_write(folder / "results.md", results_markdown(results, title=title))
    write_predictions(folder / "predictions", predictions, trained.names)
    if config.eval.figures:
      _write_figures(folder, config, trained, examples, predictions, results, manifest.landmarks)

  replace_folder(out, write)
  log(f"results in {out}: mean radial error {results['overall'].get('mean_mm', float('nan')):.2f} mm over "
      f"{results['overall']['count']} landmarks")
  return out


def _write_figures(folder, config, trained, examples, predictions, results, data_names) -> None:
  slices = figures.case_slices(trained.model, trained.params, examples[0], names=trained.names,
                               data_names=data_names, prediction=predictions[0])
  figures.save_slices(folder / "fig3_slices.png", slices, title=f"{examples[0].case_id}: truth + prediction x, "
                      "finest-scale heatmap")
  runs = {Path(folder).name: results}
  for other in [w.strip() for w in config.eval.compare_workdirs.split(",") if w.strip()]:
    path = Path(other) / "eval" / config.eval.split / "results.json"
    if not path.is_file():
      raise io.DataError(path, "no such file: evaluate that workdir first")
    runs[Path(other).name] = json.loads(path.read_text())
  figures.save_violin(folder / "fig4_errors.png", {name: [e for case in r["per_case"] for e in case["error_mm"]
                                                         if e is not None] for name, r in runs.items()})
  if "uncertainty" in results:
    figures.save_confidence_vs_error(folder / "fig5_confidence.png", results)
