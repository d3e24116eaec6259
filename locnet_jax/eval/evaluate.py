"""Evaluation behind `evaluate.py`: a trained run's checkpoint scored on a data set split.

For every case: the deterministic prediction of every scale and, for a multi-scale Loc-Net, the test-time
uncertainty (`inference.make_uncertainty`: N noise samples of the finest scale in one jitted call; the
prediction is their mean), optionally calibrated on another split. Writes results.json, results.md, the
predictions and the paper's figures to one folder (`outputs.py`: checked before any work, each file written
atomically, nothing else in it touched).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np

from locnet_jax import dataset, from_config, io, outputs
from locnet_jax.eval import figures, predict, qc, restore, scoring


def evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, log=print) -> Path:
  """Scores the run in `workdir` on `config.eval.split` of `config.data`; returns the output folder."""
  workdir = Path(workdir)
  from_config.validate(config)
  from_config.check_model_config(config, workdir)
  manifest = dataset.load_manifest(from_config.manifest_path(config.data, seed=config.seed, log=log))
  settings = from_config.preprocess_settings(config.data)
  cache = from_config.cache_dir(config.data, manifest)
  out = Path(config.eval.out_dir) if config.eval.out_dir else workdir / "eval" / config.eval.split
  inputs = [c.image for c in manifest.cases] + [c.landmarks for c in manifest.cases if c.landmarks]
  outputs.check_output_folder(out, inputs=inputs, runs=[workdir])  # before any work
  outputs.check_writable(workdir)  # qc.json
  examples = from_config.load_split(manifest, config.eval.split, settings, cache)
  trained = restore.restore(config, workdir, example=examples[0], which=config.eval.checkpoint)
  log(f"evaluating {trained.checkpoint} on {len(examples)} {config.eval.split} cases of {manifest.path}")
  predictions = predict.predict_cases(trained, examples, num_samples=config.eval.num_noise_samples,
                              chunk_size=config.eval.chunk_size, seed=config.seed)
  fitted, checks = None, qc.load(workdir)
  split = config.eval.calibrate_split
  if (predictions[0]["std_mm"] is not None and split and split != config.eval.split
      and any(c.split == split for c in manifest.cases)):
    held_out = from_config.load_split(manifest, split, settings, cache)
    log(f"calibrating the uncertainty and fitting the QC thresholds on {len(held_out)} {split} cases")
    held = predict.predict_cases(trained, held_out, num_samples=config.eval.num_noise_samples,
                                 chunk_size=config.eval.chunk_size, seed=config.seed + 1)
    scale = scoring.calibration(held, held_out, model_names=trained.names, data_names=manifest.landmarks)
    fitted = {"split": split, "cases": len(held_out), "scale": scale}
    _, mi, di = scoring.matched(trained.names, manifest.landmarks)
    checks = qc.fit(held, np.stack([ex.target_mm[di] for ex in held_out]), model_index=mi,
                    calibration_scale=scale, split=f"{manifest.path.parent.name}/{split}")
    io.atomic_write(workdir / qc.QC_FILE, json.dumps(checks, indent=1) + "\n")
  else:
    fitted = qc.calibration(checks)
  predictions = [qc.annotate(p, checks) for p in predictions]
  results = scoring.score(predictions, examples, model_names=trained.names, data_names=manifest.landmarks,
                  calibration=fitted)
  if checks is not None:
    results["qc_thresholds"] = checks
  results.update(checkpoint=str(trained.checkpoint), data=str(manifest.path), split=config.eval.split,
                 num_noise_samples=config.eval.num_noise_samples, device=jax.devices()[0].device_kind)
  title = f"{workdir.name} on {manifest.path.parent.name} ({config.eval.split}, {len(examples)} cases)"

  def write(folder: Path) -> None:
    io.atomic_write(folder / "results.json", json.dumps(results, indent=1) + "\n")
    io.atomic_write(folder / "results.md", scoring.results_markdown(results, title=title))
    predict.write_predictions(folder / "predictions", predictions, trained.names)
    if config.eval.figures:
      _write_figures(folder, config, trained, examples, predictions, results, manifest.landmarks)

  write(outputs.prepare_output_folder(out, inputs=inputs, runs=[workdir]))
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
