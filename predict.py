"""Finds the landmarks in new scans (no ground truth): NIfTI in, 3D Slicer `.mrk.json` + CSV out, with uncertainty.

    python predict.py --workdir=workdirs/demo --image=scan1.nii.gz,scan2.nii.gz --out=predictions/

Uses the run's own config (`<workdir>/config.json`) and its best checkpoint, or an exported model folder
(export_model.py); without --workdir, the model shipped in pretrained/afids6 (see its model.json). Per image, `<name>.mrk.json`
(LPS, as 3D Slicer saves; open it over the image) and `<name>.csv` (RAS mm, with per-axis std and the 90 %
confidence volume when the model has >= 2 scales, calibrated when the model folder carries a calibration),
and all of them in `predictions.csv`. Each landmark gets a status, `ok`, `uncertain` or `absent` (no
coordinates; an unplaced point in the .mrk.json) from the model's QC thresholds (locnet_jax/eval/qc.py);
one warning line per image with any landmark not ok. The output folder
gets only these files, each written atomically (nothing else there is touched; a folder holding an input or
a model is refused). Bad input: one line `error: <file>: <problem>`,
exit status 2.
"""

import sys
from pathlib import Path

from absl import app, flags, logging

from locnet_jax import cli, from_config, io
from locnet_jax.eval import predict

DEFAULT_MODEL = Path(__file__).resolve().parent / "pretrained" / "afids6"
_WORKDIR = flags.DEFINE_string("workdir", str(DEFAULT_MODEL),
                               "A trained run's folder or an exported model folder (default: the shipped model).")
_IMAGES = flags.DEFINE_list("image", None, "NIfTI images (comma-separated).", required=True)
_OUT = flags.DEFINE_string("out", "predictions", "Output folder (created if absent; only its own files written).")
_SAMPLES = flags.DEFINE_integer("num_noise_samples", None, "Noise samples (default: the run's eval config).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    predictions = predict.predict_images(Path(_WORKDIR.value), _IMAGES.value, Path(_OUT.value), num_samples=_SAMPLES.value)
  except (io.DataError, from_config.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for p in predictions:
    counts = {s: p["status"].count(s) for s in ("ok", "uncertain", "absent")}
    print(f"{p['case_id']}: {len(p['pred_mm'][-1])} landmarks, " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f" ({p['seconds']:.1f} s)")
  for line in predict.warnings(predictions):
    print(line, file=sys.stderr)
  print(f"written to {_OUT.value}/ (.mrk.json for 3D Slicer, .csv in RAS mm)")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
