"""Runs as a user has them: reproducible, resumable after a kill, stopped cleanly by a NaN, every Table-1 config."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locnet_jax import from_config
from locnet_jax.data import augment_host, loader
from locnet_jax.model import inference
from locnet_jax.train import loop
from tests import helpers


@pytest.mark.slow  # a whole training run
def test_same_seed_same_parameters_and_another_seed_differs(tmp_path):
  config = helpers.tiny_config()
  first = loop.train_and_evaluate(config, tmp_path / "a", log=lambda *_: None)
  second = loop.train_and_evaluate(config, tmp_path / "b", log=lambda *_: None)
  helpers.assert_trees_equal(helpers.restore_run(tmp_path / "a", config).state.params, helpers.restore_run(tmp_path / "b", config).state.params)
  assert first["val_error_mm"] == second["val_error_mm"] and helpers.metrics_records(tmp_path / "a") == helpers.metrics_records(tmp_path / "b")
  other = helpers.tiny_config(seed=1)
  loop.train_and_evaluate(other, tmp_path / "c", log=lambda *_: None)
  a, c = helpers.restore_run(tmp_path / "a", config).state.params, helpers.restore_run(tmp_path / "c", other).state.params
  assert not np.array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(c)[0])


@pytest.mark.slow  # a whole training run
def test_best_checkpoint_is_the_lowest_validation_error(tmp_path):
  config = helpers.tiny_config(**{"train.num_epochs": 4})
  summary = loop.train_and_evaluate(config, tmp_path, log=lambda *_: None)
  records = helpers.metrics_records(tmp_path)
  finest = [r["val_error_mm"][-1] for r in records]
  assert summary["best_epoch"] == int(np.argmin(finest)) and summary["best_val_error_mm"] == pytest.approx(min(finest), abs=1e-4)  # records: 4 decimals
  best = helpers.restore_run(tmp_path, config, best=True)
  assert best.epochs_done == summary["best_epoch"] + 1 and summary["best_checkpoint"].endswith(f"best/{best.epochs_done}")
  # the best checkpoint really holds that model: its validation error is the recorded one
  data = from_config.load_data(config.data, seed=config.seed, log=lambda *_: None)
  model = from_config.create_model(config.model, num_landmarks=2, num_scales=2)
  errors = loop.validation_errors(inference.make_predict(model), best.state.params, data.val, batch_size=1)
  np.testing.assert_allclose(errors[-1], min(finest), rtol=1e-3)



@pytest.mark.slow  # a whole training run
def test_a_run_always_ends_with_a_best_checkpoint_and_holds_its_workdir(tmp_path, monkeypatch):
  """Validation errors that are never finite still leave a loadable best (the last epoch); while the run
  holds the workdir's lock, a second trainer fails at once naming it; afterwards the lock is free."""
  from locnet_jax import io
  from locnet_jax.train import checkpoints
  config = helpers.tiny_config(**{"train.num_epochs": 2})
  monkeypatch.setattr(loop, "validation_errors", lambda *a, **k: np.array([np.nan, np.nan]))
  summary = loop.train_and_evaluate(config, tmp_path, log=lambda *_: None)
  assert summary["best_checkpoint"].endswith("best/2")
  assert helpers.restore_run(tmp_path, config, best=True).epochs_done == 2
  with checkpoints.WorkdirLock(tmp_path):
    with pytest.raises(io.DataError, match=r"in use by another training run \(PID \d+ on "):
      loop.train_and_evaluate(config, tmp_path, log=lambda *_: None)
  assert (tmp_path / ".lock").read_text() == ""  # released and cleared




@pytest.mark.slow  # a whole training run
def test_an_unfinished_save_and_a_torn_metrics_line_do_not_break_resuming(tmp_path):
  config = helpers.tiny_config(**{"train.num_epochs": 4})
  loop.train_and_evaluate(config, tmp_path / "whole", log=lambda *_: None)
  whole_state = helpers.restore_run(tmp_path / "whole", config).state
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
  helpers.assert_trees_equal(helpers.restore_run(run, config).state, whole_state)
  assert helpers.metrics_records(run) == helpers.metrics_records(tmp_path / "whole")
  assert not list(latest.glob("*tmp*")) and summary["epoch"] == 3


@pytest.mark.slow  # a whole training run
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
  config = helpers.tiny_config(**{"train.num_epochs": 5})
  with pytest.raises(loop.TrainingDiverged, match=r"non-finite training loss \(nan\) at epoch 3, step 5.*"
                     r"last good checkpoint is .*latest/2"):
    loop.train_and_evaluate(config, tmp_path, log=lambda *_: None)
  assert [r["epoch"] for r in helpers.metrics_records(tmp_path)] == [0, 1]
  kept = helpers.restore_run(tmp_path, config)
  assert kept.epochs_done == 2 and all(np.all(np.isfinite(p)) for p in jax.tree.leaves(kept.state.params))




@pytest.mark.slow  # a whole training run
def test_a_workdir_refuses_another_config_but_not_other_loader_workers(tmp_path):
  loop.train_and_evaluate(helpers.tiny_config(**{"train.num_epochs": 1}), tmp_path, log=lambda *_: None)
  with pytest.raises(from_config.ConfigError, match=r"model.unet.base_channels: 2 -> 4"):
    loop.train_and_evaluate(helpers.tiny_config(**{"train.num_epochs": 1, "model.unet.base_channels": 4}), tmp_path)
  log = []
  loop.train_and_evaluate(helpers.tiny_config(**{"train.num_epochs": 1, "train.loader_workers": 0}), tmp_path,
                               log=log.append)
  assert log == [f"{tmp_path}: already trained for 1 epochs"]








# ---------------------------------------------------------------- every Table-1 configuration









# ---------------------------------------------------------------- data parallelism









@pytest.mark.slow  # a whole training run
def test_training_on_a_data_set_fills_the_cache_once(tmp_path, monkeypatch):
  manifest = helpers.tiny_dataset(tmp_path / "data")
  config = helpers.tiny_file_config(manifest, tmp_path / "cache")
  record = loop.train_and_evaluate(config, tmp_path / "run1")
  assert record["epoch"] == 1 and record["step"] == 6 and len(record["val_error_mm"]) == 2
  cached = sorted((tmp_path / "cache").glob("*.npz"))
  assert len(cached) == 4  # 3 train + 1 val
  monkeypatch.setattr(loader, "compute_pyramid", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
  again = loop.train_and_evaluate(config, tmp_path / "run2")
  assert sorted((tmp_path / "cache").glob("*.npz")) == cached
  assert again["train_loss"] == record["train_loss"]  # same data, same augmentation, same steps


@pytest.mark.slow  # a whole training run
def test_device_augmentation_replaces_the_workers_and_a_resumed_run_replays_it(tmp_path, monkeypatch):
  import shutil

  manifest = helpers.tiny_dataset(tmp_path / "data")
  config = helpers.tiny_file_config(manifest, tmp_path / "cache")
  config.train.loader_workers = 0  # inline: the host augmentation below would run in this process
  plain = config.copy_and_resolve_references()
  plain.train.augment = False
  config.train.augment_on = "device"
  monkeypatch.setattr(augment_host, "augment", lambda *a, **k: (_ for _ in ()).throw(AssertionError("host augment")))
  whole = loop.train_and_evaluate(config, tmp_path / "whole", log=lambda *_: None)
  unaugmented = loop.train_and_evaluate(plain, tmp_path / "plain", log=lambda *_: None)
  assert whole["train_loss"] != unaugmented["train_loss"]  # the device did augment
  # the same run, as if stopped after its first epoch: it resumes at step 3 and ends bit for bit the same
  shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
  for kind in ("latest", "best"):
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / kind / "2", ignore_errors=True)
  log = []
  resumed = loop.train_and_evaluate(config, tmp_path / "resumed", log=log.append)
  assert any("resuming from" in line and "(epoch 1, step 3)" in line for line in log), log
  assert resumed["train_loss"] == whole["train_loss"] and resumed["val_error_mm"] == whole["val_error_mm"]


def test_a_bad_augment_on_is_a_config_error(tmp_path):
  config = helpers.tiny_file_config(helpers.tiny_dataset(tmp_path / "data"), tmp_path / "cache")
  config.train.augment_on = "gpu"
  with pytest.raises(from_config.ConfigError, match=r"train.augment_on 'gpu'; supported: .*'device'"):
    loop.train_and_evaluate(config, tmp_path / "run", log=lambda *_: None)
  assert loop.resolve_augment_on("auto") == ("host" if jax.default_backend() == "cpu" else "device")


@pytest.mark.slow  # a whole training run
def test_a_training_set_on_the_device_trains_exactly_as_the_loader(tmp_path):
  config = helpers.tiny_file_config(helpers.tiny_dataset(tmp_path / "data"), tmp_path / "cache")
  config.train.augment_on, config.train.loader_workers, config.train.data_on = "device", 0, "host"
  loaded = loop.train_and_evaluate(config, tmp_path / "loaded", log=lambda *_: None)
  config.train.data_on = "device"
  log = []
  resident = loop.train_and_evaluate(config, tmp_path / "resident", log=log.append)
  assert any(line.startswith("training set on the device: ") for line in log), log
  assert resident["train_loss"] == loaded["train_loss"] and resident["val_error_mm"] == loaded["val_error_mm"]
  config.train.augment_on = "host"
  with pytest.raises(from_config.ConfigError, match="data_on='device' .*augment_on=device"):
    loop.train_and_evaluate(config, tmp_path / "refused", log=lambda *_: None)


@pytest.mark.parametrize("value, kwargs, expected", [
    ("host", dict(backend="gpu"), "host"),
    ("device", dict(backend="cpu"), "device"),
    ("auto", dict(backend="gpu"), "device"),  # 9.8 GB of 80: fits
    ("auto", dict(backend="gpu", bytes_limit=16e9), "host"),  # over half of 16 GB
    ("auto", dict(backend="cpu"), "host"),  # the CPU's loader workers run beside the step
    ("auto", dict(backend="gpu", host_augment=True), "host"),  # the host still augments
    ("auto", dict(backend="gpu", processes=2), "host"),
    ("auto", dict(backend="gpu", bytes_limit=None), "host"),  # no memory figure: no guess
])
def test_where_the_training_set_lives(value, kwargs, expected):
  calls = []

  def need_bytes():
    calls.append(1)
    return 9.8e9
  args = dict(host_augment=False, backend="gpu", processes=1, bytes_limit=80e9, need_bytes=need_bytes) | kwargs
  assert loop.choose_data_on(value, **args) == expected
  assert len(calls) <= 1 and (value == "auto" or not calls)  # sizes read only when they decide


def test_a_bad_data_on_is_a_config_error(tmp_path):
  config = helpers.tiny_file_config(helpers.tiny_dataset(tmp_path / "data"), tmp_path / "cache")
  config.train.data_on = "gpu"
  with pytest.raises(from_config.ConfigError, match=r"train.data_on 'gpu'; supported"):
    loop.train_and_evaluate(config, tmp_path / "run", log=lambda *_: None)


@pytest.mark.slow  # two training runs
def test_a_run_can_start_from_an_exported_model(tmp_path):
  from locnet_jax.train import checkpoints
  config = helpers.tiny_config(**{"train.num_epochs": 1})
  loop.train_and_evaluate(config, tmp_path / "a", log=lambda *_: None)
  source = helpers.restore_run(tmp_path / "a", config).state.params
  checkpoints.export_model(tmp_path / "m", source, {"landmarks": list(from_config.landmark_names(config.data))})
  # a learning rate so small that one epoch of Adam moves no parameter by more than ~1e-8
  tuned = helpers.tiny_config(**{"train.num_epochs": 1, "train.learning_rate": 1e-9, "model.presence": True,
                                 "train.init_from": str(tmp_path / "m")})
  logs = []
  loop.train_and_evaluate(tuned, tmp_path / "b", log=logs.append)
  params = helpers.restore_run(tmp_path / "b", tuned).state.params
  assert set(params) == {*source, "presence"}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), {k: params[k] for k in source}, source)
  assert any("starting from" in line and "(new: presence (2))" in line for line in logs)
  records = [json.loads(line) for run in "ab" for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
  assert "train_presence_bce" not in records[0] and 0 < records[1]["train_presence_bce"] < 10  # logged with presence


def test_the_flat_schedule_weighs_every_scale_one_in_every_epoch():
  config = helpers.tiny_config(**{"train.schedule": "flat", "train.num_epochs": 4}).train
  for epoch in range(4):
    weights, trainable = loop.schedule(config, epoch, num_scales=3)
    np.testing.assert_array_equal(weights, np.ones(3))
    assert trainable is None
  paper = loop.schedule(helpers.tiny_config(**{"train.num_epochs": 4}).train, 0, num_scales=3)[0]
  np.testing.assert_array_equal(paper, [1.0, 0.0, 0.0])  # the paper's starts from the coarse scale alone
  with pytest.raises(loop.ConfigError, match="flat"):
    loop.schedule(helpers.tiny_config(**{"train.schedule": "steep"}).train, 0, num_scales=3)
