"""Trains a Loc-Net model.

    python train.py --config=configs/multiscale.py:demo --workdir=workdirs/demo
    python train.py --config=configs/multiscale.py --config.train.num_epochs=3

Flags: --config (a config file, optionally `:variant`), --workdir, and any --config.<field>=<value>
override (unknown fields are rejected).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from locnet_jax import io, train_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/multiscale.py", "Training configuration.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Where metrics and config are written.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    final = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (io.DataError, train_lib.ConfigError) as e:  # bad input or settings: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"done: final validation error per scale {final['val_error_mm']} mm; metrics in "
        f"{_WORKDIR.value}/metrics.jsonl")


if __name__ == "__main__":
  app.run(main)
