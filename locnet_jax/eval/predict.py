"""Predictions of a trained model on cases: the deterministic pass, the 50-pass uncertainty, and the files
users open (3D Slicer `.mrk.json` and CSV, RAS mm in the world of the case's original image).

Outputs follow `outputs.py`: the folder is checked before any work (never a file, never one holding an
input or a model folder), and only the files of the predicted cases are written, each atomically.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from locnet_jax import from_config, io, outputs
from locnet_jax.data import loader
from locnet_jax.eval import cohort, metrics, qc, restore
from locnet_jax.eval.restore import Trained
from locnet_jax.model import inference
from locnet_jax.model.locnet import MultiScaleLocNet


class Predictor:
  """A trained model's predictions, one case at a time, compiled once for the config's pyramid shapes: the
  deterministic pass, and with `num_samples` > 0 (multi-scale models) the noise passes' mean and std."""

  def __init__(self, trained: Trained, *, num_samples: int, chunk_size: int):
    self.trained = trained
    self.uncertain = isinstance(trained.model, MultiScaleLocNet) and trained.model.num_scales >= 2 and num_samples > 0
    self._fn = (inference.make_uncertainty(trained.model, num_samples=num_samples, chunk_size=chunk_size)
                if self.uncertain else inference.make_forward(trained.model))
    self._compiled = None

  def _args(self, example: loader.Example, key: jax.Array) -> tuple:
    batch = loader.collate([example])
    return (self.trained.params, batch["volumes"], batch["affines"]) + ((key,) if self.uncertain else ())

  def compile(self, example: loader.Example) -> float:
    """Compiles ahead of time for `example`'s shapes (every case of one config has them); returns seconds."""
    start = time.perf_counter()
    self._compiled = self._fn.lower(*self._args(example, jax.random.key(0))).compile()
    return time.perf_counter() - start

  def __call__(self, example: loader.Example, key: jax.Array) -> dict:
    """{"case_id", "names" (K,) the model's landmarks, "pred_mm" (S, K, 3), "mean_mm"/"std_mm" (K, 3) or None,
    "presence" (K,) probability that each landmark is in the image (`qc.presence`: against `example.grid`,
    and the model's presence output if it has one) or None (neither known), "fov_mm" (3,) the image's field of
    view along its voxel axes or None (unknown; `qc` reads it), "seconds"}."""
    args = self._args(example, key)
    start = time.perf_counter()
    try:
      result = (self._compiled or self._fn)(*args)
    except TypeError:  # another shape than the compiled one: the jitted function compiles for it
      result = self._fn(*args)
    result = jax.device_get(result)
    if self.uncertain:
      pred = np.array(result["pred_mm"][0])
      pred[-1] = result["deterministic_mm"][0]
      mean, std = np.asarray(result["pred_mm"][0, -1]), np.asarray(result["std_mm"][0])
    else:
      pred, mean, std = np.asarray(result["pred_mm"][0]), None, None
    learnt = None
    if "presence_logit" in result:
      learnt = 1.0 / (1.0 + np.exp(-np.asarray(result["presence_logit"][0], np.float64)))
    presence = qc.presence(pred, example.grid, learnt)
    return {"case_id": example.case_id, "names": self.trained.names, "pred_mm": pred, "mean_mm": mean, "std_mm": std,
            "presence": presence, "fov_mm": qc.field_of_view_mm(example.grid), "seconds": time.perf_counter() - start}


def predict_cases(trained: Trained, examples: list[loader.Example], *, num_samples: int, chunk_size: int,
                  seed: int) -> list[dict]:
  """`Predictor` records of `examples`, case i's noise keyed by ``fold_in(key(seed), i)``."""
  predictor = Predictor(trained, num_samples=num_samples, chunk_size=chunk_size)
  return [predictor(example, jax.random.fold_in(jax.random.key(seed), i)) for i, example in enumerate(examples)]


def case_key(seed: int, case_id: str) -> jax.Array:
  """The noise key of a predicted case: from the seed and its case id only, so a case gets the same noise
  passes alone, in any cohort, order or shard."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(case_id.encode()) & 0x7FFFFFFF)


def prediction_rows(predictions: list[dict], names) -> list[dict]:
  """Rows of the predictions CSV (docs/data_format.md): every landmark the model predicts, RAS mm; with
  `qc.annotate`d records, the calibrated uncertainty, presence and status (an absent landmark: no x, y, z);
  "seconds", the case's wall time (predict.py: reading and preprocessing its image, and the model)."""
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
      if p.get("seconds") is not None:
        row["seconds"] = round(float(p["seconds"]), 3)
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


def write_case(files: dict, prediction: dict, names) -> None:
  """One case's files (`cohort.Job.files`): "mrk" (`.mrk.json`, LPS as 3D Slicer saves; an absent landmark
  an unplaced point, each point's status in its description), optional "fcsv" (RAS; absent landmarks left
  out) and "csv" (`prediction_rows`), written each atomically and the CSV last (it marks the case done)."""
  status = prediction.get("status")
  descriptions = None if status is None else [f"status={s}" for s in status]
  unplaced = [] if status is None else [n for n, s in zip(names, status) if s == "absent"]
  Path(files["csv"]).parent.mkdir(parents=True, exist_ok=True)
  io.write_mrk_json(files["mrk"], list(names), _point(prediction), coordinate_system="LPS",
                    descriptions=descriptions, unplaced=unplaced)
  if "fcsv" in files:
    io.write_fcsv(files["fcsv"], list(names), _point(prediction))
  io.write_predictions_csv(files["csv"], prediction_rows([prediction], names))


def write_predictions(folder: Path, predictions: list[dict], names) -> None:
  """`<case>.mrk.json` and `<case>.csv` per case (`write_case`), and all of them in `predictions.csv`."""
  folder.mkdir(parents=True, exist_ok=True)
  for p in predictions:
    write_case({"mrk": folder / f"{p['case_id']}.mrk.json", "csv": folder / f"{p['case_id']}.csv"}, p, names)
  io.write_predictions_csv(folder / "predictions.csv", prediction_rows(predictions, names))


def warnings(predictions: list[dict]) -> list[str]:
  """One line per case with any landmark not "ok": which are uncertain and which absent."""
  lines = []
  for p in predictions:
    groups = {s: [n for n, t in zip(p["names"], p.get("status", [])) if t == s] for s in ("uncertain", "absent")}
    parts = [f"{s}: {', '.join(g)}" for s, g in groups.items() if g]
    if parts:
      lines.append(f"warning: {p['case_id']}: " + "; ".join(parts))
  return lines


@dataclasses.dataclass
class CohortResult:
  """What a run over jobs did: the cases predicted now (records with QC and "load_s", "model_s",
  "write_s"), the jobs skipped as already done, the failures (file, problem), the compilation seconds."""

  predicted: list[dict]
  skipped: list[cohort.Job]
  failed: list[tuple[Path, str]]
  compile_s: float | None


def predict_jobs(workdir: Path, jobs: list[cohort.Job], *, out: Path, summary_csv: str | None = "predictions.csv",
                 num_samples: int | None = None, overwrite: bool = False, on_case=None,
                 prefetch: bool = True) -> CohortResult:
  """Predicts `jobs` (`cohort.py`) one image at a time with one compilation, the model in `workdir` (a run's
  best checkpoint or an exported model folder, which carries its config and QC thresholds).

  A job already done is skipped unless `overwrite`; an image that cannot be read or used is reported in
  `failed` and the others go on. `out` is checked (`outputs.py` rules) before any work; `summary_csv`
  (a name in `out`, or None) gathers the CSV rows of every done job, written when there is one.
  `on_case(done, total, record_or_failure)` is called after each image (a progress bar). A case's noise is
  keyed by its id (`case_key`), so shards and reruns give the same numbers. With `prefetch` the next image
  is read and preprocessed while the model runs on the current one (`_read_ahead`); the records are the
  same either way, and a record's "load_s" is its own reading time, overlapped or not.
  """
  workdir = Path(workdir)
  if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 0):
    raise from_config.ConfigError(f"num_noise_samples={num_samples!r}: an int >= 0")
  if not jobs:
    raise io.DataError(out, "no images given")
  images = [job.image for job in jobs]
  outputs.check_output_folder(out, inputs=images, runs=[workdir])
  config = restore.saved_config(workdir)
  settings = from_config.preprocess_settings(config.data)
  samples = config.eval.num_noise_samples if num_samples is None else num_samples
  checks = qc.load(workdir)
  done_before = [not overwrite and job.done() for job in jobs]  # one look at the disk per job
  todo = [job for job, done in zip(jobs, done_before) if not done]
  result = CohortResult([], [job for job, done in zip(jobs, done_before) if done], [], None)
  predictor = None
  for n, (job, example, load_s) in enumerate(_read_ahead(todo, settings, prefetch=prefetch)):
    if isinstance(example, io.DataError):
      result.failed.append((Path(example.path), example.problem))
      if on_case is not None:
        on_case(n + 1, len(todo), result.failed[-1])
      continue
    if predictor is None:
      outputs.prepare_output_folder(out, inputs=images, runs=[workdir])
      trained = restore.restore(config, workdir, example=example)
      predictor = Predictor(trained, num_samples=samples, chunk_size=config.eval.chunk_size)
      result.compile_s = predictor.compile(example)
    record = qc.annotate(predictor(example, case_key(config.seed, job.case_id)), checks)
    record.update(load_s=load_s, model_s=record["seconds"], seconds=load_s + record["seconds"])
    start = time.perf_counter()
    write_case(job.files, record, predictor.trained.names)
    record["write_s"] = time.perf_counter() - start
    result.predicted.append(record)
    if on_case is not None:
      on_case(n + 1, len(todo), record)
  done = [job for job in jobs if job.done()]
  if summary_csv and done and (result.predicted or not (Path(out) / summary_csv).is_file()):
    io.atomic_write(Path(out) / summary_csv, _gather_csv([job.files["csv"] for job in done]))
  return result


def _read_job(job: cohort.Job, settings) -> tuple[cohort.Job, loader.Example | io.DataError, float]:
  """(job, its image read and preprocessed, or the `DataError` that stopped it, seconds taken)."""
  start = time.perf_counter()
  try:
    example = loader.Example(job.case_id, loader.compute_pyramid(job.image, settings), np.zeros((0, 3)),
                             grid=io.load_grid(job.image))
  except io.DataError as error:
    example = error
  return job, example, time.perf_counter() - start


def _read_ahead(jobs: list[cohort.Job], settings, *, prefetch: bool):
  """`_read_job` of each job in order; with `prefetch`, the next image is read in a background thread
  while the caller predicts the current one (the model releases the GIL while XLA runs; one image ahead, so
  at most two pyramids are in memory)."""
  if not prefetch or len(jobs) < 2:
    yield from (_read_job(job, settings) for job in jobs)
    return
  with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="locnet-read") as pool:
    pending = pool.submit(_read_job, jobs[0], settings)
    for n in range(len(jobs)):
      done = pending.result()
      if n + 1 < len(jobs):
        pending = pool.submit(_read_job, jobs[n + 1], settings)
      yield done


def _gather_csv(paths: list[Path]) -> str:
  """The per-case CSVs (one header, `io.PREDICTION_COLUMNS`) as one table, in the order given."""
  lines = []
  for i, path in enumerate(paths):
    text = path.read_text().splitlines()
    lines.extend(text if i == 0 else text[1:])
  return "\n".join(lines) + "\n"


def predict_images(workdir: Path, images: list, out: Path, *, num_samples: int | None = None) -> list[dict]:
  """Predicts NIfTI `images` (no ground truth) into the folder `out` (`predict_jobs`, plain layout: a case
  is named by its file name without `.nii.gz` / `.nii`; two images with one name are an error), every
  image predicted again. Returns the records; an image that fails is a `DataError` after the others ran."""
  if not images:
    raise io.DataError(out, "no images given")
  result = predict_jobs(workdir, cohort.plain_jobs([Path(i) for i in images], Path(out)), out=Path(out),
                        num_samples=num_samples, overwrite=True)
  if result.failed:
    raise io.DataError(*result.failed[0])
  return result.predicted
