"""Trains a Loc-Net model (or a Table-1 baseline); rerunning the same command resumes it.

    python train.py --config=configs/multiscale.py:demo --workdir=workdirs/demo
    python train.py --config=configs/multiscale.py --config.train.num_epochs=3

Flags: --config (a config file, optionally `:variant`), --workdir, and any --config.<field>=<value>
override (unknown fields are rejected). Exit status: 0 trained (or already trained), 2 bad data or
config, 3 the loss became non-finite (the latest checkpoint is the last good state).
"""

import sys

from absl import app, flags, logging

from locnet_jax import cli, from_config, io, xla_env
from locnet_jax.train import loop

_CONFIG = cli.define_config("config", "configs/multiscale.py", "Training configuration.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default",
                               "Run folder: config, metrics, TensorBoard events, checkpoints.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  xla_env.prefer_channels_last_convolutions()  # before the first computation: GPU convolutions in NDHWC
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  try:
    summary = loop.train_and_evaluate(cli.config_value(_CONFIG), _WORKDIR.value)
  except (io.DataError, from_config.ConfigError) as e:  # bad input or settings: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except loop.TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  print(f"done: best checkpoint {summary['best_checkpoint']} (epoch {summary['best_epoch'] + 1}), validation "
        f"error {summary['best_val_error_mm']:.2f} mm (finest scale); metrics in {_WORKDIR.value}/metrics.jsonl, "
        f"TensorBoard: tensorboard --logdir {_WORKDIR.value}/tensorboard")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
