"""The command-line scripts' flag parsing: a bad flag, config file, variant or config field is one line
``error: ...`` and exit status 2, like every other bad input, never a traceback."""

from __future__ import annotations

import sys

from absl import flags

EXIT_BAD_INPUT = 2


def _one_line(error: BaseException) -> str:
  """The message of `error` on one line: for a wrapped traceback, its last line (the real error)."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip().strip("\"'") for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = [lines[0].split(":")[0] + ":", lines[-1]]
  return " ".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
  """`absl.app.run`'s `flags_parser`: the flags parsed, or one line on stderr and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as error:  # an override of a field the config does not have
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    _fail(f"unknown config field in {', '.join(overrides) or 'the overrides'} ({_one_line(error)}); every field is "
          "declared, with its meaning, in configs/default.py")
  except (flags.Error, OSError, ValueError, TypeError) as error:
    _fail(_one_line(error))


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def define_config(name: str, default: str, help_string: str):
  """`config_flags.DEFINE_config_file` (locked: unknown fields are rejected). An override naming an unknown
  field fails here, when the flag is defined (ml_collections reads the overrides from sys.argv then)."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except (KeyError, AttributeError) as error:
    overrides = [a.split("=")[0] for a in sys.argv[1:] if a.startswith(f"--{name}.")]
    _fail(f"unknown config field in {', '.join(overrides) or 'the overrides'} ({_one_line(error)}); every field is "
          "declared, with its meaning, in configs/default.py")


def config_value(flag):
  """The parsed config of a `define_config` flag; a config file that cannot be loaded is one line."""
  try:
    value = flag.value
    value.keys()  # a config file that failed to load is a placeholder that raises on first use
    return value
  except (OSError, ValueError, ImportError, SyntaxError) as error:
    _fail(f"--config: {_one_line(error)}")
