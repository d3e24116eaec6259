"""The training loop behind `train.py`: config -> model, data, schedule, epochs, metrics.

Library code below this module takes explicit arguments; this is where the config is unpacked.
Metrics go to ``<workdir>/metrics.jsonl`` (one JSON object per epoch) and the config to
``<workdir>/config.json``. Data: the in-memory synthetic set, a DATA_FORMAT.md data set (preprocessed
once into the pyramid cache, augmented by background workers), or the AFIDs benchmark (built on first
use). Checkpoints and resuming come with the training issue.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from locnet_jax import augment as augment_lib
from locnet_jax import io, losses, pipeline, synthetic, training
from locnet_jax.datasets import afids
from locnet_jax.models import MultiScaleLocNet

MODEL_KINDS = ("multiscale",)


class ConfigError(ValueError):
  """A configuration that cannot run (the CLI prints it on one line)."""


def create_model(model_config: ml_collections.ConfigDict, *, num_landmarks: int,
                 num_scales: int) -> MultiScaleLocNet:
  """The model a config's `model` section describes."""
  if model_config.kind == "multiscale":
    return MultiScaleLocNet(num_landmarks, num_scales=num_scales, patch_shape=(model_config.patch_size,) * 3,
                            unet=model_config.unet.to_dict(), com_kind=model_config.com_kind,
                            noise_mm=model_config.noise_mm, stop_gradient=model_config.stop_gradient)
  raise ConfigError(f"unsupported model.kind {model_config.kind!r}; supported: {MODEL_KINDS}")


@dataclasses.dataclass(frozen=True)
class Data:
  """What training reads: training sources (Examples or cached cases), validation Examples, names."""

  train: list
  val: list[pipeline.Example]
  names: tuple[str, ...]
  from_files: bool


def preprocess_settings(data_config: ml_collections.ConfigDict) -> pipeline.PreprocessSettings:
  return pipeline.PreprocessSettings(spacings_mm=tuple(data_config.spacings_mm), finest_size=data_config.finest_size,
                                     intensity=data_config.intensity, ct_window_hu=tuple(data_config.ct_window_hu))


def _manifest_path(data_config, *, seed: int, log=print) -> Path:
  if data_config.source == "manifest":
    if not data_config.manifest:
      raise ConfigError("data.source='manifest' needs --config.data.manifest=PATH")
    return Path(data_config.manifest)
  folder = Path(data_config.afids_dir)
  if not (folder / "dataset.json").is_file():
    log(f"building the AFIDs benchmark in {folder} (once)")
    afids.build(folder, seed=seed, landmarks=tuple(n.strip() for n in data_config.afids_landmarks.split(",")),
                log=lambda *_: None)
  return folder / "dataset.json"


def load_data(data_config: ml_collections.ConfigDict, *, seed: int, log=print) -> Data:
  """The config's data: synthetic cases in memory, or a data set preprocessed once into the cache."""
  if data_config.source == "synthetic":
    kwargs = dict(spacings_mm=tuple(data_config.spacings_mm), finest_size=data_config.finest_size,
                  num_landmarks=data_config.num_landmarks)
    names = tuple(f"L{k}" for k in range(data_config.num_landmarks))
    return Data(synthetic.make_cases(seed, data_config.num_train, **kwargs),
                synthetic.make_cases(seed + 1_000_003, data_config.num_val, **kwargs), names, False)
  if data_config.source not in ("manifest", "afids"):
    raise ConfigError(f"unsupported data.source {data_config.source!r}; supported: ('synthetic', 'manifest', 'afids')")
  manifest = io.load_manifest(_manifest_path(data_config, seed=seed, log=log))
  settings = preprocess_settings(data_config)
  cache = Path(data_config.cache_dir) if data_config.cache_dir else manifest.path.parent / ".locnet_cache"
  train = []
  for case in manifest.split("train"):
    pipeline.load_example(case, manifest.landmarks, settings, cache)  # validates, fills the cache once
    train.append(pipeline.CachedCase(case, manifest.landmarks, settings, cache))
  val = [pipeline.load_example(case, manifest.landmarks, settings, cache) for case in manifest.split("val")]
  log(f"data: {manifest.path} ({len(train)} train, {len(val)} val cases, {len(manifest.landmarks)} landmarks), "
      f"cache {cache}")
  return Data(train, val, manifest.landmarks, True)


def _validate(state, cases, *, batch_size) -> np.ndarray:
  """Mean radial error (mm) per scale over the validation cases, no noise."""
  predict = jax.jit(lambda p, b: state.apply_fn({"params": p}, b["volumes"], b["affines"])["pred_mm"])
  errors = []
  for i in range(0, len(cases), batch_size):
    batch = pipeline.collate(cases[i:i + batch_size])
    pred = np.asarray(predict(state.params, batch))
    errors.append(np.linalg.norm(pred - np.asarray(batch["target_mm"])[:, None], axis=-1))  # (B, S, K)
  errors = np.concatenate(errors)
  return np.nanmean(errors, axis=(0, 2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains for `config.train.num_epochs`; returns the last epoch's metrics."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  data = load_data(config.data, seed=config.seed)
  num_scales = len(config.data.spacings_mm)
  model = create_model(config.model, num_landmarks=len(data.names), num_scales=num_scales)
  root = jax.random.key(config.seed)
  example = pipeline.collate(data.val[:1])
  state = training.create_train_state(model, key=jax.random.fold_in(root, 0), volumes=example["volumes"],
                                      affines=example["affines"], learning_rate=config.train.learning_rate)
  step_fn = jax.jit(training.train_step, donate_argnums=0)
  batch_size, epochs = config.train.batch_size, config.train.num_epochs
  step, record = 0, {}
  augment = augment_lib.AugmentSettings() if (config.train.augment and data.from_files) else None
  loader = pipeline.Loader(data.train, batch_size=batch_size, seed=config.seed, augment=augment,
                           workers=config.train.loader_workers if data.from_files else 0)
  with loader, open(workdir / "metrics.jsonl", "a") as log:
    for epoch in range(epochs):
      start = time.perf_counter()
      weights = losses.loss_weights(epoch, num_epochs=epochs, num_scales=num_scales)
      epoch_loss = []
      for batch in loader.epoch(epoch):
        noise_key = jax.random.fold_in(jax.random.fold_in(root, 1), step) if config.train.noise else None
        state, metrics = step_fn(state, batch, noise_key, weights=weights)
        epoch_loss.append(float(metrics["loss"]))
        step += 1
      val_error = _validate(state, data.val, batch_size=batch_size)
      record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(epoch_loss)),
                "loss_weights": np.asarray(weights).round(4).tolist(),
                "val_error_mm": [round(float(e), 3) for e in val_error], "epoch_s": round(time.perf_counter() - start, 2)}
      if not np.isfinite(record["train_loss"]):
        raise FloatingPointError(f"non-finite training loss at epoch {epoch}; see {workdir / 'metrics.jsonl'}")
      log.write(json.dumps(record) + "\n")
      log.flush()
      errors = " ".join(f"{e:.1f}" for e in record["val_error_mm"])
      print(f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.1f} mm^2  val error per scale (coarse to "
            f"fine) {errors} mm  ({record['epoch_s']:.0f} s)", flush=True)
  return record
