"""The training step learns, and train.py runs end to end on a tiny config."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import multiscale
from locnet_jax import from_config
from locnet_jax.data import augment_host, loader, synthetic
from locnet_jax.model import losses
from locnet_jax.model.locnet import MultiScaleLocNet
from locnet_jax.train import loop, steps

ROOT = Path(__file__).resolve().parents[1]


def test_training_step_overfits_one_case():
  case = synthetic.make_case(np.random.default_rng(0), spacings_mm=(8.0, 4.0), finest_size=16,
                             num_landmarks=2)
  batch = loader.collate([case])
  model = MultiScaleLocNet(2, num_scales=2, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4))
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                      affines=batch["affines"], learning_rate=3e-3)
  step = jax.jit(steps.train_step)
  weights = jnp.array([1.0, 1.0])
  first = None
  for i in range(60):
    state, metrics = step(state, batch, None, weights=weights)
    first = first if first is not None else metrics
  assert state.step == 60
  assert np.all(np.isfinite(metrics["per_scale_error_mm"]))
  assert float(metrics["grad_norm"]) > 0 and float(metrics["param_norm"]) > 0
  # the metrics agree with the model: mean radial error per scale
  pred = state.apply_fn({"params": state.params}, batch["volumes"], batch["affines"])["pred_mm"]
  assert float(metrics["loss"]) < 0.3 * float(first["loss"]), (first["loss"], metrics["loss"])
  assert np.all(np.asarray(metrics["per_scale_error_mm"]) < 0.6 * np.asarray(first["per_scale_error_mm"]))
  assert pred.shape == (1, 2, 2, 3)


def test_loss_and_metrics_match_a_direct_computation():
  case = synthetic.make_case(np.random.default_rng(1), spacings_mm=(8.0, 4.0), finest_size=16,
                             num_landmarks=3)
  batch = loader.collate([case])
  batch["target_mm"][0, 1] = np.nan
  model = MultiScaleLocNet(3, num_scales=2, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4))
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                      affines=batch["affines"], learning_rate=1e-3)
  weights = jnp.array([0.25, 0.75])
  loss, metrics = steps.loss_and_metrics(state.params, batch, apply_fn=state.apply_fn, weights=weights,
                                            noise_key=None)
  pred = np.asarray(model.apply({"params": state.params}, batch["volumes"], batch["affines"])["pred_mm"])
  dist = np.linalg.norm(pred[0] - case.target_mm, axis=-1)[:, [0, 2]]  # (S, present K)
  np.testing.assert_allclose(metrics["per_scale_error_mm"], dist.mean(axis=1), rtol=1e-5)
  np.testing.assert_allclose(loss, np.sum(np.asarray(weights) * (dist ** 2).mean(axis=1)), rtol=1e-5)


def test_train_py_runs_a_tiny_config_and_logs_the_schedule(tmp_path):
  overrides = ["--config.data.spacings_mm=(8.0, 4.0)", "--config.data.finest_size=16",
               "--config.data.num_train=2", "--config.data.num_val=1", "--config.model.patch_size=8",
               "--config.model.unet.depth=1", "--config.model.unet.base_channels=2",
               "--config.train.num_epochs=3"]
  result = subprocess.run([sys.executable, "train.py", "--config=configs/multiscale.py:synthetic_demo",
                           f"--workdir={tmp_path}", *overrides], cwd=ROOT, capture_output=True, text=True,
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


def test_train_py_rejects_unknown_override(tmp_path):
  result = subprocess.run([sys.executable, "train.py", "--config=configs/multiscale.py:synthetic_demo",
                           f"--workdir={tmp_path}", "--config.train.num_epoch=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "num_epoch" in result.stderr


def test_configs_build_their_models():
  for variant in multiscale.VARIANTS:
    config = multiscale.get_config(variant)
    model = from_config.create_model(config.model, num_landmarks=config.data.num_landmarks,
                                   num_scales=len(config.data.spacings_mm))
    assert model.num_scales == len(config.data.spacings_mm) and model.patch_shape == (config.model.patch_size,) * 3
  paper = multiscale.get_config()
  assert tuple(paper.data.spacings_mm) == (4.0, 2.0, 1.0, 0.5) and paper.data.finest_size == 448
  assert paper.model.patch_size == 56 and paper.train.learning_rate == 5e-4 and paper.train.num_epochs == 500
  assert paper.model.noise_mm == 5.0 and paper.train.batch_size == 1


def _tiny_dataset(root: Path, count=4) -> Path:
  """A real data set on disk: blob images (NIfTI, 2 mm, LPS-stored) with CSV/Slicer landmarks."""
  from locnet_jax import geometry, io
  rng = np.random.default_rng(0)
  affine = np.diag([-2.0, -2.0, 2.0, 1.0])
  affine[:3, 3] = [31.0, 31.0, -31.0]
  grid_mm = geometry.vox_to_mm(np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1).astype(float), affine)
  cases = []
  for i in range(count):
    points = rng.uniform(-12, 12, (2, 3))
    image = sum((k + 1) * np.exp(-np.sum((grid_mm - p) ** 2, -1) / 50) for k, p in enumerate(points))
    image = image + 0.05 * rng.standard_normal(image.shape)
    io.save_volume(root / f"c{i}.nii.gz", image.astype(np.float32), affine)
    io.write_mrk_json(root / f"c{i}.mrk.json", ["A", "B"], points, coordinate_system="LPS")
    cases.append({"id": f"c{i}", "image": f"c{i}.nii.gz", "landmarks": f"c{i}.mrk.json",
                  "split": "val" if i == count - 1 else "train"})
  (root / "dataset.json").write_text(json.dumps({"name": "tiny", "landmarks": ["A", "B"], "cases": cases}))
  return root / "dataset.json"


def _tiny_file_config(manifest, cache):
  config = multiscale.get_config("synthetic_demo")
  config.data.source, config.data.manifest, config.data.cache_dir = "manifest", str(manifest), str(cache)
  config.data.spacings_mm, config.data.finest_size = (8.0, 4.0), 16
  config.model.patch_size, config.model.unet.depth, config.model.unet.base_channels = 8, 1, 2
  config.train.num_epochs, config.train.loader_workers = 2, 1
  return config


def test_training_on_a_data_set_fills_the_cache_once(tmp_path, monkeypatch):
  manifest = _tiny_dataset(tmp_path / "data")
  config = _tiny_file_config(manifest, tmp_path / "cache")
  record = loop.train_and_evaluate(config, tmp_path / "run1")
  assert record["epoch"] == 1 and record["step"] == 6 and len(record["val_error_mm"]) == 2
  cached = sorted((tmp_path / "cache").glob("*.npz"))
  assert len(cached) == 4  # 3 train + 1 val
  monkeypatch.setattr(loader, "compute_pyramid", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
  again = loop.train_and_evaluate(config, tmp_path / "run2")
  assert sorted((tmp_path / "cache").glob("*.npz")) == cached
  assert again["train_loss"] == record["train_loss"]  # same data, same augmentation, same steps


def test_train_py_reports_bad_data_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, "train.py", "--config=configs/multiscale.py:synthetic_demo", f"--workdir={tmp_path}",
                           "--config.data.source=manifest", f"--config.data.manifest={tmp_path / 'none.json'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "none.json: no such file" in result.stderr


def test_device_augmentation_replaces_the_workers_and_a_resumed_run_replays_it(tmp_path, monkeypatch):
  import shutil

  manifest = _tiny_dataset(tmp_path / "data")
  config = _tiny_file_config(manifest, tmp_path / "cache")
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
  config = _tiny_file_config(_tiny_dataset(tmp_path / "data"), tmp_path / "cache")
  config.train.augment_on = "gpu"
  with pytest.raises(from_config.ConfigError, match=r"train.augment_on 'gpu'; supported: .*'device'"):
    loop.train_and_evaluate(config, tmp_path / "run", log=lambda *_: None)
  assert loop.resolve_augment_on("auto") == ("host" if jax.default_backend() == "cpu" else "device")


def test_a_training_set_on_the_device_trains_exactly_as_the_loader(tmp_path):
  config = _tiny_file_config(_tiny_dataset(tmp_path / "data"), tmp_path / "cache")
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
  config = _tiny_file_config(_tiny_dataset(tmp_path / "data"), tmp_path / "cache")
  config.train.data_on = "gpu"
  with pytest.raises(from_config.ConfigError, match=r"train.data_on 'gpu'; supported"):
    loop.train_and_evaluate(config, tmp_path / "run", log=lambda *_: None)
