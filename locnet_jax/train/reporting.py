"""What a training run shows and keeps: a progress bar with ETA, metrics as JSON lines and TensorBoard events.

TensorBoard event files are written with tensorboardX (protobuf only, no TensorFlow). On a terminal the
progress bar redraws one line; in a log file (not a TTY) only the per-epoch lines appear.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from locnet_jax import io


def format_duration(seconds: float) -> str:
  """'1h02m', '4m05s', '12s'."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
  """A one-line progress bar over a run's remaining steps: epoch, step, loss, last validation error, ETA.

  The ETA extrapolates the time per step measured in this process (resumed runs count from the resume).
  """

  def __init__(self, *, num_epochs: int, steps_per_epoch: int, first_epoch: int = 0, stream: TextIO = None,
               width: int = 24):
    self.num_epochs, self.steps_per_epoch = num_epochs, steps_per_epoch
    self.remaining = (num_epochs - first_epoch) * steps_per_epoch
    self.stream = stream or sys.stdout
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.width, self.done, self.val = width, 0, None
    self.start = time.perf_counter()

  def eta_s(self) -> float:
    if self.done == 0:
      return math.inf
    return (time.perf_counter() - self.start) / self.done * (self.remaining - self.done)

  def step(self, *, epoch: int, step_in_epoch: int, loss: float) -> None:
    self.done += 1
    if not self.tty:
      return
    filled = int(self.width * step_in_epoch / max(self.steps_per_epoch, 1))
    val = f"  val {self.val:.2f} mm" if self.val is not None else ""
    self.stream.write(f"\repoch {epoch + 1}/{self.num_epochs} [{'#' * filled}{'.' * (self.width - filled)}] "
                      f"{step_in_epoch}/{self.steps_per_epoch}  loss {loss:.2f}{val}  ETA {format_duration(self.eta_s())} ")
    self.stream.flush()

  def epoch_line(self, line: str, *, val_error_mm: float) -> None:
    """Ends the bar and prints the epoch summary with the ETA of the rest of the run."""
    self.val = val_error_mm
    prefix = "\r" if self.tty else ""
    self.stream.write(f"{prefix}{line}  ETA {format_duration(self.eta_s())}\n")
    self.stream.flush()


def read_metrics(path: Path) -> list[dict]:
  """The JSON-lines records of a metrics file ([] if absent); a torn last line (crash mid-write) is dropped."""
  if not path.is_file():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return records


def rewind_metrics(path: Path, *, epochs_done: int, last_record: dict | None) -> None:
  """Keeps the records of epochs < `epochs_done` (a resumed run re-logs later ones), atomically.

  `last_record` (stored in the checkpoint) restores the record of epoch `epochs_done - 1` if the run died
  between saving the checkpoint and logging it.
  """
  records = [r for r in read_metrics(path) if r.get("epoch", math.inf) < epochs_done]
  if last_record is not None and not any(r["epoch"] == last_record["epoch"] for r in records):
    records.append(last_record)
  io.atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())


class MetricsLog:
  """Appends epoch records to ``metrics.jsonl`` and scalars to TensorBoard event files in ``tensorboard/``."""

  def __init__(self, workdir: Path, *, purge_step: int | None = None):
    from tensorboardX import SummaryWriter  # imported here: only training writes events

    self.path = workdir / "metrics.jsonl"
    self._file = open(self.path, "a")
    # purge_step: TensorBoard hides events at steps >= it written by an earlier, interrupted process
    self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge_step, flush_secs=30)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    for tag, value in values.items():
      self._tb.add_scalar(tag, value, global_step=step)

  def epoch(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    scalars = {"train/loss": record["train_loss"], "train/epoch_seconds": record["epoch_s"]}
    if "train_presence_bce" in record:
      scalars["train/presence_bce"] = record["train_presence_bce"]
    for s, (error, weight) in enumerate(zip(record["val_error_mm"], record["loss_weights"])):
      scalars[f"val/error_mm_scale{s}"] = error
      scalars[f"loss_weight/scale{s}"] = weight
    self.scalars(record["step"], scalars)
    self._tb.flush()

  def close(self) -> None:
    self._file.close()
    self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
