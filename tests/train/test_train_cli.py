"""train.py as users run it (the slow, subprocess tier): a tiny run, bad input in one line, a SIGKILL resumed
exactly, a divergence stopped with exit status 3."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from locnet_jax.model import losses
from tests import helpers

pytestmark = pytest.mark.slow  # the end-to-end subprocess tier


def test_train_py_runs_a_tiny_config_and_logs_the_schedule(tmp_path):
  overrides = ["--config.data.spacings_mm=(8.0, 4.0)", "--config.data.finest_size=16",
               "--config.data.num_train=2", "--config.data.num_val=1", "--config.model.patch_size=8",
               "--config.model.unet.depth=1", "--config.model.unet.base_channels=2",
               "--config.train.num_epochs=3"]
  result = subprocess.run([sys.executable, "train.py", "--config=configs/multiscale.py:synthetic_demo",
                           f"--workdir={tmp_path}", *overrides], cwd=helpers.ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [0, 1, 2] and records[-1]["step"] == 6
  for r in records:
    expected = losses.loss_weights(r["epoch"], num_epochs=3, num_scales=2)
    np.testing.assert_allclose(r["loss_weights"], expected, atol=1e-4)
    assert len(r["val_error_mm"]) == 2 and all(np.isfinite(r["val_error_mm"]))
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["patch_size"] == 8 and saved["data"]["num_landmarks"] == 2
  finest = [r["val_error_mm"][-1] for r in records]
  best = int(np.argmin(finest))
  assert (f"done: best checkpoint {tmp_path}/checkpoints/best/{best + 1} (epoch {best + 1}), validation error "
          f"{finest[best]:.2f} mm") in result.stdout


BAD_FLAGS = [
    (["--config.train.num_epoch=3"], 'unknown config field in --config.train.num_epoch (num_epoch Did you mean "num_epochs"'),
    (["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py"),
    (["--config=configs/multiscale.py:bogus"], "unknown variant 'bogus'"),
    (["--config.train.num_epochs=abc"], "--config.train.num_epochs=abc: invalid literal"),
    (["--config.train.learning_rate=-1"], "train.learning_rate=-1.0: > 0"),
    (["--config.data.finest_size=100"], "data.finest_size=100"),
]


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[f[0] for f, _ in BAD_FLAGS])
def test_bad_flags_and_configs_are_one_line_before_any_work(tmp_path, flags, message):
  result = subprocess.run([sys.executable, "train.py", "--config=configs/multiscale.py:synthetic_demo",
                           f"--workdir={tmp_path / 'run'}", *flags], cwd=helpers.ROOT, capture_output=True, text=True,
                          timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  assert message in lines[0] and not (tmp_path / "run").exists()


def test_train_py_reports_bad_data_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, "train.py", "--config=configs/multiscale.py:synthetic_demo", f"--workdir={tmp_path}",
                           "--config.data.source=manifest", f"--config.data.manifest={tmp_path / 'none.json'}"],
                          cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "none.json: no such file" in result.stderr


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  """SIGKILL after a checkpoint, rerun the same command: the same final parameters and metrics as one run."""
  command = [sys.executable, "train.py", *helpers.tiny_cli_overrides(6)]
  killed = tmp_path / "killed"
  process = subprocess.Popen([*command, f"--workdir={killed}"], cwd=helpers.ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed / "checkpoints" / "latest" / "2").is_dir() and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert (killed / "checkpoints" / "latest" / "2").is_dir() and len(helpers.metrics_records(killed)) < 6, "not killed mid-way"
  resumed = subprocess.run([*command, f"--workdir={killed}"], cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from" in resumed.stdout
  whole = subprocess.run([*command, f"--workdir={tmp_path / 'whole'}"], cwd=helpers.ROOT, capture_output=True, text=True,
                         timeout=600)
  assert whole.returncode == 0, whole.stderr[-2000:]
  config = helpers.tiny_config(**{"train.num_epochs": 6})
  helpers.assert_trees_equal(helpers.restore_run(killed, config).state, helpers.restore_run(tmp_path / "whole", config).state)
  assert helpers.metrics_records(killed) == helpers.metrics_records(tmp_path / "whole")
  assert [r["epoch"] for r in helpers.metrics_records(killed)] == list(range(6))


def test_train_py_exits_3_with_one_line_when_training_diverges(tmp_path):
  result = subprocess.run([sys.executable, "train.py", *helpers.tiny_cli_overrides(2), "--config.train.learning_rate=1e30",
                           f"--workdir={tmp_path}"], cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 3, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite training loss") and "No checkpoint was saved yet" in last


def _children(pid: int) -> list[int]:
  """PIDs whose parent is `pid` (from /proc)."""
  out = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.append(int(stat.parent.name))
  return out


def _alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


@pytest.mark.slow  # a training subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /dev/shm are Linux's")
def test_a_killed_trainer_leaves_no_worker_and_no_shared_memory(tmp_path):
  manifest = helpers.tiny_dataset(tmp_path / "data", count=6)
  overrides = [f"--config.{k}={v}" for k, v in {
      "data.source": "manifest", "data.manifest": manifest, "data.cache_dir": tmp_path / "cache",
      "data.spacings_mm": "(8.0, 4.0)", "data.finest_size": 16, "model.patch_size": 8, "model.unet.depth": 1,
      "model.unet.base_channels": 2, "model.patch_groups": 1, "train.num_epochs": 50,
      "train.loader_workers": 2}.items()]
  process = subprocess.Popen([sys.executable, "train.py", "--config=configs/multiscale.py:synthetic_demo", *overrides,
                              f"--workdir={tmp_path / 'run'}"], cwd=helpers.ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (tmp_path / "run" / "checkpoints" / "latest" / "2").is_dir() and time.time() < deadline:
    time.sleep(0.05)
  workers = [p for p in _children(process.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
  assert len(workers) >= 2 and process.poll() is None, "the run never reached its second epoch with its workers"
  process.send_signal(signal.SIGKILL)
  process.wait()
  deadline = time.time() + 30
  while (any(_alive(p) for p in workers) or list(Path("/dev/shm").glob(f"locnet_{process.pid}_*"))) and (
      time.time() < deadline):
    time.sleep(0.1)
  assert not [p for p in workers if _alive(p)], "loader workers outlived the killed trainer"
  assert not list(Path("/dev/shm").glob(f"locnet_{process.pid}_*")), "shared-memory blocks outlived the run"


@pytest.mark.slow  # two training subprocesses
def test_a_second_trainer_on_a_busy_workdir_exits_2_naming_the_first(tmp_path):
  command = [sys.executable, "train.py", *helpers.tiny_cli_overrides(4), f"--workdir={tmp_path}"]
  first = subprocess.Popen(command, cwd=helpers.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (tmp_path / ".lock").is_file() or not (tmp_path / ".lock").read_text():
    assert time.time() < deadline and first.poll() is None, "the first trainer never took the lock"
    time.sleep(0.05)
  second = subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  lines = second.stderr.strip().splitlines()
  assert second.returncode == 2 and len(lines) == 1 and f"in use by another training run (PID {first.pid} on " in lines[0]
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-2000:]
  assert [r["epoch"] for r in helpers.metrics_records(tmp_path)] == [0, 1, 2, 3]  # the first run's metrics, intact
