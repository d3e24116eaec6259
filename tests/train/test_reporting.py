"""What a run shows and keeps: TensorBoard event files holding the logged metrics, the progress bar, durations."""

import struct
from pathlib import Path

import pytest

from locnet_jax.train import loop, reporting
from tests import helpers


def _read_events(path: Path) -> list:
  """Every Event in a TensorBoard file, each record's length and data checked by their masked CRC-32C."""
  from tensorboardX.crc32c import crc32c
  from tensorboardX.proto import event_pb2

  def masked(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  raw, events, offset = path.read_bytes(), [], 0
  while offset < len(raw):
    header = raw[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", raw[offset + 8:offset + 12])[0] == masked(header)
    data = raw[offset + 12:offset + 12 + length]
    assert struct.unpack("<I", raw[offset + 12 + length:offset + 16 + length])[0] == masked(data)
    events.append(event_pb2.Event.FromString(data))
    offset += 16 + length
  return events


@pytest.mark.slow  # many programs to compile: over 25 s on 2 cores
def test_tensorboard_events_hold_the_logged_metrics(tmp_path):
  loop.train_and_evaluate(helpers.tiny_config(), tmp_path, log=lambda *_: None)
  files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for event in _read_events(files[0]):
    for value in event.summary.value:
      scalars[(value.tag, event.step)] = value.simple_value
  for record in helpers.metrics_records(tmp_path):
    assert scalars[("train/loss", record["step"])] == pytest.approx(record["train_loss"], rel=1e-6)
    for s, error in enumerate(record["val_error_mm"]):
      assert scalars[(f"val/error_mm_scale{s}", record["step"])] == pytest.approx(error, rel=1e-6)
  assert sorted(step for tag, step in scalars if tag == "train/step_loss") == list(range(1, 7))


def test_progress_bar_and_durations():
  assert [reporting.format_duration(s) for s in (5, 65, 3725, float("inf"))] == ["5s", "1m05s", "1h02m", "?"]

  class Tty:
    def __init__(self):
      self.text = ""

    def isatty(self):
      return True

    def write(self, text):
      self.text += text

    def flush(self):
      pass

  stream = Tty()
  progress = reporting.Progress(num_epochs=3, steps_per_epoch=4, first_epoch=1, stream=stream)
  progress.step(epoch=1, step_in_epoch=2, loss=12.5)
  assert "epoch 2/3" in stream.text and "2/4" in stream.text and "loss 12.50" in stream.text
  assert 0 < progress.eta_s() < 1e3 and progress.remaining == 8
  progress.epoch_line("epoch 2/3 summary", val_error_mm=3.0)
  assert stream.text.endswith("\n") and "ETA" in stream.text.splitlines()[-1]
