"""Evaluates a trained Loc-Net model (test-time uncertainty, metrics, Slicer files).

Not implemented yet: it arrives with the evaluation issue, after checkpoints (training issue). Until
then this entry point only parses its flags and exits with status 2 and a one-line message.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/multiscale.py", "Configuration.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")


def main(argv):
  del argv
  print("evaluate.py: evaluation is not implemented yet (it needs the checkpoints of the training issue)",
        file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main)
