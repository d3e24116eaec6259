"""Runs as a user has them: reproducible, resumable after a kill, stopped cleanly by a NaN, every Table-1 config."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import heatmap_unet, multiscale, multistep, no_noise, single_scale
from locnet_jax import from_config
from locnet_jax.data import loader
from locnet_jax.model import inference
from locnet_jax.train import checkpoints, loop, reporting, steps

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data.spacings_mm": (8.0, 4.0), "data.finest_size": 16, "data.num_train": 2, "data.num_val": 1,
        "model.patch_size": 8, "model.unet.depth": 1, "model.unet.base_channels": 2}


def _tiny_config(**changes):
  config = multiscale.get_config("synthetic_demo")
  for key, value in {**TINY, "train.num_epochs": 3, **changes}.items():
    *path, name = key.split(".")
    target = config
    for part in path:
      target = target[part]
    target[name] = value
  return config


def _cli_overrides(num_epochs):
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  return ["--config=configs/multiscale.py:synthetic_demo", *flags, f"--config.train.num_epochs={num_epochs}"]


def _restore(workdir, config, *, best=False):
  """The params of a run's latest (or best) checkpoint, restored into a freshly built state."""
  data = from_config.load_data(config.data, seed=config.seed, log=lambda *_: None)
  model = from_config.create_model(config.model, num_landmarks=len(data.names),
                                 num_scales=len(config.data.spacings_mm))
  example = loader.collate(data.val[:1])
  state = steps.create_train_state(model, key=jax.random.key(99), volumes=example["volumes"],
                                      affines=example["affines"], learning_rate=1.0)
  with checkpoints.Checkpoints(Path(workdir) / "checkpoints") as ckpts:
    restored = ckpts.restore_best(state) if best else ckpts.restore_latest(state)
  return restored


def _assert_trees_equal(a, b):
  if isinstance(a, steps.TrainState):  # the arrays: step, parameters, optimiser moments
    a, b = (a.step, a.params, a.opt_state), (b.step, b.params, b.opt_state)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _records(workdir):
  return [{k: v for k, v in r.items() if k != "epoch_s"} for r in reporting.read_metrics(Path(workdir) / "metrics.jsonl")]


def test_same_seed_same_parameters_and_another_seed_differs(tmp_path):
  config = _tiny_config()
  first = loop.train_and_evaluate(config, tmp_path / "a", log=lambda *_: None)
  second = loop.train_and_evaluate(config, tmp_path / "b", log=lambda *_: None)
  _assert_trees_equal(_restore(tmp_path / "a", config).state.params, _restore(tmp_path / "b", config).state.params)
  assert first["val_error_mm"] == second["val_error_mm"] and _records(tmp_path / "a") == _records(tmp_path / "b")
  other = _tiny_config(seed=1)
  loop.train_and_evaluate(other, tmp_path / "c", log=lambda *_: None)
  a, c = _restore(tmp_path / "a", config).state.params, _restore(tmp_path / "c", other).state.params
  assert not np.array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(c)[0])


def test_best_checkpoint_is_the_lowest_validation_error(tmp_path):
  config = _tiny_config(**{"train.num_epochs": 4})
  summary = loop.train_and_evaluate(config, tmp_path, log=lambda *_: None)
  records = _records(tmp_path)
  finest = [r["val_error_mm"][-1] for r in records]
  assert summary["best_epoch"] == int(np.argmin(finest)) and summary["best_val_error_mm"] == pytest.approx(min(finest), abs=1e-4)  # records: 4 decimals
  best = _restore(tmp_path, config, best=True)
  assert best.epochs_done == summary["best_epoch"] + 1 and summary["best_checkpoint"].endswith(f"best/{best.epochs_done}")
  # the best checkpoint really holds that model: its validation error is the recorded one
  data = from_config.load_data(config.data, seed=config.seed, log=lambda *_: None)
  model = from_config.create_model(config.model, num_landmarks=2, num_scales=2)
  errors = loop.validation_errors(inference.make_predict(model), best.state.params, data.val, batch_size=1)
  np.testing.assert_allclose(errors[-1], min(finest), rtol=1e-3)


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  """SIGKILL after a checkpoint, rerun the same command: the same final parameters and metrics as one run."""
  command = [sys.executable, "train.py", *_cli_overrides(6)]
  killed = tmp_path / "killed"
  process = subprocess.Popen([*command, f"--workdir={killed}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed / "checkpoints" / "latest" / "2").is_dir() and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert (killed / "checkpoints" / "latest" / "2").is_dir() and len(_records(killed)) < 6, "not killed mid-way"
  resumed = subprocess.run([*command, f"--workdir={killed}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from" in resumed.stdout
  whole = subprocess.run([*command, f"--workdir={tmp_path / 'whole'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
  assert whole.returncode == 0, whole.stderr[-2000:]
  config = _tiny_config(**{"train.num_epochs": 6})
  _assert_trees_equal(_restore(killed, config).state, _restore(tmp_path / "whole", config).state)
  assert _records(killed) == _records(tmp_path / "whole")
  assert [r["epoch"] for r in _records(killed)] == list(range(6))


def test_an_unfinished_save_and_a_torn_metrics_line_do_not_break_resuming(tmp_path):
  config = _tiny_config(**{"train.num_epochs": 4})
  loop.train_and_evaluate(config, tmp_path / "whole", log=lambda *_: None)
  whole_state = _restore(tmp_path / "whole", config).state
  # a copy of the finished run, made to look killed while saving epoch 4: Orbax's unfinished temporary
  # folder instead of latest/4, no best/4, half a metrics line
  run = tmp_path / "run"
  shutil.copytree(tmp_path / "whole", run)
  latest = run / "checkpoints" / "latest"
  (latest / "4").rename(latest / "4.orbax-checkpoint-tmp")
  (latest / "4.orbax-checkpoint-tmp" / "state" / "garbage").write_bytes(b"\0" * 10)
  shutil.rmtree(run / "checkpoints" / "best" / "4", ignore_errors=True)
  lines = (run / "metrics.jsonl").read_text().splitlines()
  (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])
  log = []
  summary = loop.train_and_evaluate(config, run, log=log.append)
  assert any("resuming from" in line and line.rstrip().endswith("(epoch 3, step 6)") for line in log), log
  _assert_trees_equal(_restore(run, config).state, whole_state)
  assert _records(run) == _records(tmp_path / "whole")
  assert not list(latest.glob("*tmp*")) and summary["epoch"] == 3


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real = loop.make_train_step

  def poisoned(config):  # the loss (and the parameters) turn NaN from the 5th step on
    step = real(config)

    def run(state, batch, key, weights, trainable):
      bad = state.step >= 4
      state, metrics = step(state, batch, key, weights, trainable)
      poison = jnp.where(bad, jnp.nan, 1.0)
      return (state.replace(params=jax.tree.map(lambda p: p * poison, state.params)),
              {**metrics, "loss": metrics["loss"] * poison})
    return run

  monkeypatch.setattr(loop, "make_train_step", poisoned)
  config = _tiny_config(**{"train.num_epochs": 5})
  with pytest.raises(loop.TrainingDiverged, match=r"non-finite training loss \(nan\) at epoch 3, step 5.*"
                     r"last good checkpoint is .*latest/2"):
    loop.train_and_evaluate(config, tmp_path, log=lambda *_: None)
  assert [r["epoch"] for r in _records(tmp_path)] == [0, 1]
  kept = _restore(tmp_path, config)
  assert kept.epochs_done == 2 and all(np.all(np.isfinite(p)) for p in jax.tree.leaves(kept.state.params))


def test_train_py_exits_3_with_one_line_when_training_diverges(tmp_path):
  result = subprocess.run([sys.executable, "train.py", *_cli_overrides(2), "--config.train.learning_rate=1e30",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 3, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite training loss") and "No checkpoint was saved yet" in last


def test_a_workdir_refuses_another_config_but_not_other_loader_workers(tmp_path):
  loop.train_and_evaluate(_tiny_config(**{"train.num_epochs": 1}), tmp_path, log=lambda *_: None)
  with pytest.raises(from_config.ConfigError, match=r"model.unet.base_channels: 2 -> 4"):
    loop.train_and_evaluate(_tiny_config(**{"train.num_epochs": 1, "model.unet.base_channels": 4}), tmp_path)
  log = []
  loop.train_and_evaluate(_tiny_config(**{"train.num_epochs": 1, "train.loader_workers": 0}), tmp_path,
                               log=log.append)
  assert log == [f"{tmp_path}: already trained for 1 epochs"]


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


def test_tensorboard_events_hold_the_logged_metrics(tmp_path):
  loop.train_and_evaluate(_tiny_config(), tmp_path, log=lambda *_: None)
  files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for event in _read_events(files[0]):
    for value in event.summary.value:
      scalars[(value.tag, event.step)] = value.simple_value
  for record in _records(tmp_path):
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


# ---------------------------------------------------------------- every Table-1 configuration

TABLE_1 = {"heatmap_unet": heatmap_unet, "single_scale": single_scale, "multistep": multistep,
           "no_noise": no_noise, "multiscale": multiscale}


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_every_table_1_config_builds_and_runs_one_step(name):
  paper = TABLE_1[name].get_config()
  config = TABLE_1[name].get_config("synthetic_demo")
  with config.unlocked():
    if len(config.data.spacings_mm) == 1:  # a whole-volume baseline: keep its one level, make it small
      config.data.finest_size, config.model.unet.depth, config.model.extra_levels = 16, 1, 1
    else:
      config.data.spacings_mm, config.data.finest_size, config.model.patch_size = (8.0, 4.0), 16, 8
      config.model.unet.depth = 1
    config.model.unet.base_channels, config.data.num_val = 2, 1
  num_scales = len(config.data.spacings_mm)
  data = from_config.load_data(config.data, seed=0, log=lambda *_: None)
  model = from_config.create_model(config.model, num_landmarks=len(data.names), num_scales=num_scales)
  batch = loader.collate(data.train[:1])
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                      affines=batch["affines"], learning_rate=1e-2)
  before = jax.tree.map(np.array, state.params)
  weights, trainable = loop.schedule(config.train, config.train.num_epochs - 1, num_scales=num_scales)
  key = jax.random.key(1) if config.train.noise else None
  state, metrics = loop.make_train_step(config)(state, batch, key, weights, trainable)
  assert np.isfinite(float(metrics["loss"])) and metrics["per_scale_error_mm"].shape == (num_scales,)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.params))
  if name == "multistep":  # last phase: only the finest scale trains, the coarse one is frozen exactly
    assert not any(jax.tree.leaves(changed["scale0"])) and all(jax.tree.leaves(changed["scale1"]))
  else:
    assert all(jax.tree.leaves(changed))
  # the paper-size config of the same row
  kind = {"heatmap_unet": "heatmap", "single_scale": "single_scale"}.get(name, "multiscale")
  assert paper.model.kind == kind and paper.train.num_epochs == 500 and paper.train.learning_rate == 5e-4
  assert tuple(paper.data.spacings_mm) == ((1.0,) if kind != "multiscale" else (4.0, 2.0, 1.0, 0.5))
  assert paper.train.noise == (name == "multiscale") and paper.model.stop_gradient == (name == "multistep")


def test_multistep_trains_each_scale_in_turn_and_the_paper_schedule_all_at_once():
  config = multistep.get_config("demo")  # 3 scales
  config.train.num_epochs = 6  # two epochs per scale, coarse first
  phases = [loop.schedule(config.train, e, num_scales=3) for e in range(6)]
  assert [np.asarray(w).tolist() for w, _ in phases] == [[1, 0, 0]] * 2 + [[0, 1, 0]] * 2 + [[0, 0, 1]] * 2
  assert all(np.array_equal(w, t) for w, t in phases)
  weights, trainable = loop.schedule(multiscale.get_config("demo").train, 3, num_scales=3)
  assert trainable is None and np.all(np.asarray(weights) > 0)


def test_single_volume_configs_refuse_noise_and_several_scales():
  config = single_scale.get_config("demo")
  with config.unlocked():
    config.train.noise = True
  with pytest.raises(from_config.ConfigError, match="train.noise=True needs"):
    loop.train_and_evaluate(config, "/nonexistent/never-created")
  with pytest.raises(from_config.ConfigError, match="one entry, got 3"):
    from_config.create_model(heatmap_unet.get_config("demo").model, num_landmarks=2, num_scales=3)


# ---------------------------------------------------------------- data parallelism

_SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from locnet_jax import parallel
from locnet_jax.data import loader
from locnet_jax.data import synthetic
from locnet_jax.train import steps
from locnet_jax.model.locnet import MultiScaleLocNet
cases = [synthetic.make_case(np.random.default_rng(i), spacings_mm=(8.0, 4.0), finest_size=16, num_landmarks=2)
         for i in range(4)]
batch = loader.collate(cases)
model = MultiScaleLocNet(2, num_scales=2, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4))
out = {}
for count in (1, 4):
  mesh = parallel.data_mesh(batch_size=4, devices=jax.devices()[:count])
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                      affines=batch["affines"], learning_rate=1e-2)
  state = parallel.replicate(state, mesh)
  step = jax.jit(steps.train_step)
  for i in range(3):
    sharded = parallel.shard_batch(batch, mesh)
    state, metrics = step(state, sharded, jax.random.key(i), weights=jnp.array([0.5, 1.0]))
  leaf = jax.tree.leaves(state.params)[0]
  out[count] = dict(devices=len(sharded["volumes"][1].sharding.device_set), param_devices=len(leaf.sharding.device_set),
                    loss=float(metrics["loss"]), params=[np.asarray(p).ravel().tolist() for p in jax.tree.leaves(state.params)])
out["mesh_sizes"] = [parallel.data_mesh(batch_size=b).devices.size for b in (4, 6, 5, 8)]
json.dump(out, sys.stdout)
"""


def test_the_data_parallel_step_equals_the_single_device_step():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout)
  assert out["1"]["devices"] == 1 and out["4"]["devices"] == 4 and out["4"]["param_devices"] == 4
  assert out["mesh_sizes"] == [4, 3, 1, 4]  # the most devices that split the batch evenly
  assert out["1"]["loss"] == pytest.approx(out["4"]["loss"], rel=1e-5)
  for one, four in zip(out["1"]["params"], out["4"]["params"]):
    np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-6)
