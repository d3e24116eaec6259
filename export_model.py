"""Exports a trained run's parameters (its best checkpoint, or `--config.eval.checkpoint=latest`) as a small,
self-contained model folder for predict.py.

    python export_model.py --config=configs/multiscale.py:afids6 --workdir=workdirs/afids6 --out=pretrained/afids6

The folder holds `params/` (Orbax, parameters only: no optimiser state) and `model.json` (the config,
landmark names, the training data, each training run's time and hardware (with those of the models a
continued run started from), validation and test errors when `evaluate.py` has run, QC and calibration).
"""

import sys
from pathlib import Path

from absl import app, flags, logging

from locnet_jax import cli, from_config, io
from locnet_jax.eval import restore

_CONFIG = cli.define_config("config", "configs/multiscale.py", "The run's training configuration.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's folder.", required=True)
_OUT = flags.DEFINE_string("out", None, "The model folder to write.", required=True)
_NOTES = flags.DEFINE_string("notes", "", "Free text for the model card (what it was trained on, caveats).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config, workdir = cli.config_value(_CONFIG), Path(_WORKDIR.value)
  try:
    from_config.check_model_config(config, workdir)
    data = from_config.load_data(config.data, seed=config.seed, log=lambda *_: None)
    card = restore.export(config, workdir, Path(_OUT.value), example=data.val[0], notes=_NOTES.value,
                          training_data=from_config.data_recipe(config.data, seed=config.seed))
  except (io.DataError, from_config.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported {card['checkpoint']} ({len(card['landmarks'])} landmarks) to {_OUT.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
