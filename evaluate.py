"""Scores a trained run on a data set split: errors, uncertainty, predictions for 3D Slicer, figures.

    python evaluate.py --config=configs/multiscale.py:demo --workdir=workdirs/demo
    python evaluate.py --config=configs/multiscale.py:demo --workdir=workdirs/demo \\
        --config.data.source=manifest --config.data.manifest=other/dataset.json --config.eval.split=val

Pass the config (and overrides) the run was trained with; `data.*` and `eval.*` may differ (another data
set, split, number of noise samples). Writes <workdir>/eval/<split>/ (or --config.eval.out_dir):
results.json, results.md, predictions/ (.mrk.json + .csv per case, predictions.csv) and fig*.png.
Exit status 2 on bad data or config.
"""

import sys

from absl import app, flags, logging

from locnet_jax import cli, from_config, io, xla_env
from locnet_jax.eval import evaluate

_CONFIG = cli.define_config("config", "configs/multiscale.py", "The run's training configuration.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "The trained run's folder.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  xla_env.prefer_channels_last_convolutions()  # before the first computation: GPU convolutions in NDHWC
  logging.set_verbosity(logging.WARNING)
  try:
    out = evaluate.evaluate(cli.config_value(_CONFIG), _WORKDIR.value)
  except (io.DataError, from_config.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print((out / "results.md").read_text())


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
