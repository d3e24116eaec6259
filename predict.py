"""Finds the landmarks in new scans (no ground truth): NIfTI in, 3D Slicer `.mrk.json` + CSV out, with uncertainty.

    python predict.py --image=scan1.nii.gz,scan2.nii.gz --out=predictions/        # files, folders or globs
    python predict.py --image='scans/*.nii.gz' --out=predictions/ --shard=0/4     # a quarter of a cohort
    python predict.py --bids=BIDS_DIR --out=OUT_DIR [--participant_label=01,02] [--shard=0/4]

Without --workdir, the model shipped in pretrained/afids32 (all 32 AFIDs at 1 mm, trained for other contrasts
and anatomies, with QC thresholds; see its model.json); pretrained/afids6_real (6 AFIDs at 2 mm, more accurate
on those six) and pretrained/afids6 (the template-only model) stay loadable with --workdir; else a training run's folder
(its config and best checkpoint) or an exported model folder (export_model.py). The images are predicted
one at a time with one compilation; a progress line per image (with the time left) goes to stderr.

Outputs (docs/data_format.md, "Predictions"). --image: per image `<name>.mrk.json` (LPS, as 3D Slicer saves;
open it over the image) and `<name>.csv` (RAS mm, per-axis std and 90 % confidence volume when the model
has >= 2 scales, calibrated when its folder carries a calibration; presence; status; seconds), and all of
them in `predictions.csv`. --bids: a BIDS derivative data set, `OUT_DIR/sub-XX/[ses-YY/]anat/
<entities>_desc-locnet_afids.{fcsv,mrk.json,csv}` for each `*_T1w.nii[.gz]`, and `dataset_description.json`.
With --shard=i/n (0-based), this process does every n-th image from the i-th (a SLURM array: --shard=
$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) and its combined CSV is `predictions_shard-<i>of<n>.csv`.
An image whose files are all there is skipped (a rerun finishes an interrupted run; --overwrite redoes it).

Each landmark gets a status, `ok`, `uncertain` or `absent` (no coordinates; an unplaced point in the
.mrk.json) from the model's QC thresholds (locnet_jax/eval/qc.py); one warning line per image with any
landmark not ok. Only these files are written, each atomically (a folder holding an input or a model is
refused).

Exit status: 2 for bad flags, model or output folder (one line `error: <file>: <problem>`, nothing done);
else the number of images that failed (each reported on one `error:` line, the others predicted), at
most 100; 0 when all are done.
"""

import sys
import time
from pathlib import Path

from absl import app, flags, logging

import locnet_jax
from locnet_jax import cli, from_config, io
from locnet_jax.eval import cohort, predict

DEFAULT_MODEL = Path(__file__).resolve().parent / "pretrained" / "afids32"
_WORKDIR = flags.DEFINE_string("workdir", str(DEFAULT_MODEL),
                               "A trained run's folder or an exported model folder (default: the shipped model).")
_IMAGES = flags.DEFINE_list("image", None, "NIfTI images, folders of them or glob patterns (comma-separated).")
_BIDS = flags.DEFINE_string("bids", None, "A BIDS data set: predict every sub-*/[ses-*/]anat/*_T1w.nii[.gz].")
_PARTICIPANTS = flags.DEFINE_list("participant_label", None, "With --bids: these subjects only (01 or sub-01).")
_SHARD = flags.DEFINE_string("shard", None, "i/n: this process predicts shard i (0-based) of n.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Predict images whose files are already written again.")
_OUT = flags.DEFINE_string("out", "predictions", "Output folder (created if absent; only its own files written).")
_SAMPLES = flags.DEFINE_integer("num_noise_samples", None, "Noise samples (default: the run's eval config).")

MAX_EXIT_FAILED = 100


def _jobs(out: Path) -> tuple[list[cohort.Job], tuple[int, int]]:
  if (_IMAGES.value is None) == (_BIDS.value is None):
    raise io.DataError("predict.py", "give either --image or --bids")
  if _PARTICIPANTS.value and _BIDS.value is None:
    raise io.DataError("--participant_label", "only with --bids")
  index, count = cohort.parse_shard(_SHARD.value)
  if _BIDS.value is not None:
    jobs = cohort.bids_jobs(Path(_BIDS.value), out, participant_labels=_PARTICIPANTS.value)
  else:
    jobs = cohort.plain_jobs(cohort.find_images(_IMAGES.value), out)
  return cohort.shard(jobs, index, count), (index, count)


class Progress:
  """One line per image on stderr: count, case, its time or failure, and the time left (mean so far)."""

  def __init__(self):
    self.start = time.perf_counter()

  def __call__(self, done: int, total: int, record) -> None:
    elapsed = time.perf_counter() - self.start
    left = elapsed / done * (total - done)
    if isinstance(record, dict):
      counts = {s: record["status"].count(s) for s in ("ok", "uncertain", "absent")}
      what = f"{record['case_id']}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({record['seconds']:.1f} s)"
    else:
      what = "failed"
    print(f"[{done}/{total}] {what}, {time.strftime('%H:%M:%S', time.gmtime(left))} left", file=sys.stderr,
          flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  out = Path(_OUT.value)
  try:
    jobs, (index, count) = _jobs(out)
    result = predict.predict_jobs(Path(_WORKDIR.value), jobs, out=out, summary_csv=cohort.summary_csv_name(index, count),
                                  num_samples=_SAMPLES.value, overwrite=_OVERWRITE.value, on_case=Progress())
    if _BIDS.value is not None and (result.predicted or result.skipped):
      cohort.write_dataset_description(out, source=Path(_BIDS.value), model=Path(_WORKDIR.value),
                                       version=locnet_jax.__version__)
  except (io.DataError, from_config.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(cli.EXIT_BAD_INPUT)
  for path, problem in result.failed:
    print(f"error: {path}: {problem}", file=sys.stderr)
  for line in predict.warnings(result.predicted):
    print(line, file=sys.stderr)
  if result.compile_s is not None:
    print(f"compiled in {result.compile_s:.1f} s", file=sys.stderr)
  skipped = f", {len(result.skipped)} skipped as already written (--overwrite to redo)" if result.skipped else ""
  failed = f", {len(result.failed)} failed" if result.failed else ""
  print(f"{len(result.predicted)} of {len(jobs)} images predicted{skipped}{failed}; written to {out}/")
  sys.exit(min(len(result.failed), MAX_EXIT_FAILED))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
