"""Where results may be written: output folders that never swallow inputs or runs, and case ids that are
safe file names.

Output rule: the folder is created if absent and only the files a run produces are written into it, each
atomically (`io.atomic_write`): nothing else in it is removed or replaced, and an interrupted run leaves
every file either old or new. A path that is a file, that holds an input, or that is (or holds) a training
workdir or a model folder is refused before any work, with one line naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from locnet_jax.io import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_UNSAFE = re.compile(r"[/\\\x00]")


def check_case_id(case_id: str, source) -> str:
  """`case_id` if it is a safe file name (it names output files), else a `DataError` naming `source`."""
  if not isinstance(case_id, str) or not case_id.strip():
    raise DataError(source, f"case id {case_id!r} is empty")
  if _UNSAFE.search(case_id) or case_id.startswith(".") or case_id != case_id.strip():
    raise DataError(source, f"case id {case_id!r} is not a plain file name (no path separators, no leading "
                    "dot or spaces): it names the output files")
  return case_id


def case_id_from_path(path) -> str:
  """The case id of an image file: its name without `.nii.gz` / `.nii` (other dots are kept: DICOM UIDs)."""
  name = Path(path).name
  for suffix in NIFTI_SUFFIXES:
    if name.lower().endswith(suffix):
      return check_case_id(name[:-len(suffix)], path)
  return check_case_id(name, path)


def case_ids_from_paths(paths: Sequence) -> list[str]:
  """Case ids of image files (`case_id_from_path`); two files with one id are an error naming both."""
  ids, seen = [], {}
  for path in paths:
    case_id = case_id_from_path(path)
    if case_id in seen:
      raise DataError(path, f"has the case id {case_id!r} of {seen[case_id]}: their outputs would overwrite "
                      "each other; rename one")
    seen[case_id] = path
    ids.append(case_id)
  return ids


def check_writable(folder) -> Path:
  """`folder` resolved if it can be written (it, or its nearest existing parent, is writable), else a
  `DataError`: checked before any work, not discovered after it."""
  folder = Path(folder).resolve()
  existing = folder
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    raise DataError(folder, f"cannot be written ({existing} is not a writable folder)")
  return folder


def _is_run_folder(folder: Path) -> bool:
  """A training workdir (config.json + checkpoints/) or an exported model folder (model.json + params/)."""
  return ((folder / "config.json").is_file() and (folder / "checkpoints").is_dir()) or (
      (folder / "model.json").is_file() and (folder / "params").exists())


def check_output_folder(out, *, inputs: Iterable = (), runs: Iterable = ()) -> Path:
  """`out` resolved, if results may be written there (module docstring), else a `DataError`.

  Args:
    out: the output folder (created later, by `prepare_output_folder`).
    inputs: files the run reads: none may lie inside `out`.
    runs: workdirs / model folders the run uses: `out` may lie inside one, but may not be one or hold one.
  """
  out = Path(out).resolve()
  if out.exists() and not out.is_dir():
    raise DataError(out, "the output path is a file, not a folder")
  for path in inputs:
    path = Path(path).resolve()
    if path == out or out in path.parents:
      raise DataError(out, f"the output folder holds an input ({path}): choose another folder")
  for run in runs:
    run = Path(run).resolve()
    if run == out or out in run.parents:
      raise DataError(out, f"the output folder is or holds the model folder {run}: choose another folder")
  if out.is_dir() and _is_run_folder(out):
    raise DataError(out, "the output folder is a training workdir or a model folder: choose another folder")
  return check_writable(out)


def prepare_output_folder(out, **checks) -> Path:
  """`check_output_folder`, then the folder created (parents too; permissions from the umask)."""
  out = check_output_folder(out, **checks)
  out.mkdir(parents=True, exist_ok=True)
  return out
