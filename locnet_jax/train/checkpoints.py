"""A training run's checkpoints on disk (Orbax): the latest ones to resume from, and the best one.

Layout under a run's folder ``<workdir>/checkpoints``::

    latest/<epochs done>/{state, meta}   the last two, rotated; resuming reads the newest
    best/<epochs done>/{state, meta}     the newest is the one with the lowest validation error so far
                                         (the one before it is kept until the next is complete)

``state`` is the whole train state (parameters, optimiser state, step); ``meta`` is JSON: the epoch
record (losses, validation errors), the global step, the best validation error so far and the config the
run was started with. Saves are synchronous and atomic (Orbax writes to a temporary folder and renames
it when complete): a process killed mid-save leaves the previous checkpoint intact, and the unfinished
temporary folder is ignored and deleted on the next start.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from locnet_jax import io

_ITEMS = ("state", "meta")


@dataclasses.dataclass(frozen=True)
class Restored:
  """What a checkpoint holds: the train state, the epochs done and the JSON metadata."""

  state: Any
  epochs_done: int
  meta: dict


def _remove_unfinished(directory: Path) -> None:
  """Deletes the temporary folders of saves that never finished (Orbax names them `<step>.orbax-checkpoint-tmp*`).

  Done here, synchronously, rather than by Orbax's `cleanup_tmp_directories`, whose background thread
  can race a process that exits right away (e.g. on a config error) and print a traceback at shutdown.
  """
  if jax.process_index() == 0 and directory.is_dir():
    for path in directory.glob("*.orbax-checkpoint-tmp*"):
      shutil.rmtree(path, ignore_errors=True)


def _manager(directory: Path, *, max_to_keep: int) -> ocp.CheckpointManager:
  _remove_unfinished(directory)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory.absolute(), options=options, item_names=_ITEMS)


class Checkpoints:
  """The latest (resume) and best (lowest validation error) checkpoints of one run in `directory`."""

  def __init__(self, directory: str | Path):
    self.directory = Path(directory)
    self._latest = _manager(self.directory / "latest", max_to_keep=2)
    # two kept: the previous best stays complete while a new one is written (a kill mid-save loses nothing)
    self._best = _manager(self.directory / "best", max_to_keep=2)

  def save(self, epochs_done: int, state, meta: dict, *, is_best: bool) -> None:
    """Saves `state` and `meta` after `epochs_done` epochs; also as the best one when `is_best`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._latest.save(epochs_done, args=args, force=True)
    if is_best:
      self._best.save(epochs_done, args=args, force=True)

  def latest_epochs_done(self) -> int | None:
    return self._latest.latest_step()

  def best_path(self) -> Path | None:
    step = self._best.latest_step()
    return None if step is None else self.directory / "best" / str(step)

  def latest_path(self) -> Path | None:
    step = self._latest.latest_step()
    return None if step is None else self.directory / "latest" / str(step)

  def restore_latest(self, target_state) -> Restored | None:
    """The newest complete checkpoint, restored into `target_state`'s structure and shardings."""
    return self._restore(self._latest, target_state)

  def restore_best(self, target_state) -> Restored | None:
    return self._restore(self._best, target_state)

  def read_meta(self, *, best: bool = False) -> dict | None:
    manager = self._best if best else self._latest
    step = manager.latest_step()
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    self._latest.close()
    self._best.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @staticmethod
  def _restore(manager: ocp.CheckpointManager, target_state) -> Restored | None:
    step = manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
    return Restored(restored["state"], step, restored["meta"])



class WorkdirLock:
  """An exclusive lock on a training workdir (``<workdir>/.lock``, an flock): a second trainer on the same
  workdir fails at once with a `io.DataError` naming the holder (PID, host, start time). The kernel
  releases an flock when its process dies, so the lock of a killed run is taken over (with a message)
  by the next one. Local file systems only: flock may not work across the hosts of a network file system.
  """

  def __init__(self, workdir: str | Path, *, log=print):
    self.path, self.log, self._fd = Path(workdir) / ".lock", log, None

  def __enter__(self):
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise io.DataError(self.path.parent, f"in use by another training run ({holder}); wait for it to end "
                         "or use another --workdir") from None
    left = os.pread(fd, 512, 0).decode(errors="replace").strip()
    if left:
      self.log(f"{self.path.parent}: taking over the lock of {left}, which is no longer running")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc):
    os.ftruncate(self._fd, 0)  # a clean exit leaves no holder to report
    os.close(self._fd)  # releases the flock
    self._fd = None


EXPORT_PARAMS, EXPORT_META = "params", "model.json"


def export_model(directory: str | Path, params, meta: dict) -> None:
  """A small, self-contained model folder: `params/` (Orbax, parameters only) and `model.json` (the
  run's config, landmark names, provenance and measured errors). `predict.py --workdir=<it>` reads it."""
  directory = Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / EXPORT_PARAMS, params, force=True)
  io.atomic_write(directory / EXPORT_META, json.dumps(meta, indent=1) + "\n")


def is_exported(directory: str | Path) -> bool:
  return (Path(directory) / EXPORT_META).is_file() and (Path(directory) / EXPORT_PARAMS).is_dir()


def load_exported(directory: str | Path, target_params) -> tuple[Any, dict]:
  """(parameters restored into `target_params`' structure, model.json) of an exported model folder."""
  directory = Path(directory).absolute()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(directory / EXPORT_PARAMS, abstract)
  return params, json.loads((directory / EXPORT_META).read_text())


def warm_start(params, source: str | Path, *, landmarks: tuple[str, ...], only=None,
               skip: tuple[str, ...] = ()) -> tuple[Any, list[str]]:
  """Fine-tuning's start: `params` (a fresh init) with every leaf the exported model folder `source`
  holds at the same path taken from it; returns (parameters, paths kept from the init).

  Leaves the model has and the source lacks (e.g. a presence output added to a model trained without
  one) keep their init; the source's `landmarks` must equal the run's (the heatmap channels are landmarks,
  in order). `only` (a set of "a/b/c" paths; None: all) limits what is taken, so several sources can fill
  one model in turn (each the leaves the ones before it lacked). `skip` ("a/b" path prefixes) keeps the
  init of everything under them, whatever the source holds there (a scale resized since the source was
  trained). A leaf of another shape, a source that is not an exported folder, or nothing to take is a
  `io.DataError` naming `source`.
  """
  source = Path(source).absolute()
  if not is_exported(source):
    raise io.DataError(source, f"not an exported model folder ({EXPORT_META} and {EXPORT_PARAMS}/ expected; "
                               "export a run with export_model.py first)")
  saved_landmarks = tuple(json.loads((source / EXPORT_META).read_text()).get("landmarks", ()))
  if saved_landmarks != tuple(landmarks):
    raise io.DataError(source, f"its landmarks {list(saved_landmarks)} differ from the run's {list(landmarks)}")
  with ocp.StandardCheckpointer() as checkpointer:
    saved = traverse_util.flatten_dict(checkpointer.restore(source / EXPORT_PARAMS), sep="/")
  skipped = lambda path: any(path == p or path.startswith(p.rstrip("/") + "/") for p in skip)  # noqa: E731
  saved = {path: value for path, value in saved.items() if not skipped(path)}
  fresh = traverse_util.flatten_dict(params, sep="/")
  for path in sorted(set(saved) & set(fresh)):
    if tuple(saved[path].shape) != tuple(fresh[path].shape):
      raise io.DataError(source, f"parameter {path} has shape {tuple(saved[path].shape)}, the model "
                                 f"{tuple(fresh[path].shape)} (another model size in the config?)")
  unused = sorted(set(saved) - set(fresh))
  if unused:
    raise io.DataError(source, f"parameters the model the config describes lacks: {', '.join(unused[:4])}")
  taken = set(saved) & set(fresh) if only is None else set(saved) & set(only)
  if not taken:
    raise io.DataError(source, "no parameter in common with the model the config describes"
                       + ("" if only is None else " that an earlier source did not give"))
  merged = {path: (jax.numpy.asarray(saved[path], fresh[path].dtype) if path in taken else value)
            for path, value in fresh.items()}
  return traverse_util.unflatten_dict(merged, sep="/"), sorted((set(fresh) if only is None else set(only)) - taken)
