"""The training loop behind `train.py`: config -> model, data, schedule, epochs, checkpoints, metrics.

Library code below this module takes explicit arguments; this is where the config is unpacked.

A run's folder (``--workdir``) holds ``config.json``, ``metrics.jsonl`` (one JSON object per epoch),
``tensorboard/`` event files and ``checkpoints/{latest,best}`` (locnet_jax/checkpoints.py). Running the
same command again resumes from the latest checkpoint and continues exactly as if never stopped: the
data order and host augmentation derive from (seed, epoch, case), the noise key and device augmentation
(`train.augment_on`) from (seed, step), and the
state (parameters, Adam moments, step) is restored bit for bit. A workdir refuses a config that differs
from the one it was started with (except `RESUME_FREE` fields, which do not change the results).

Data: synthetic cases in memory, a DATA_FORMAT.md data set (preprocessed once into the pyramid cache,
augmented by background workers or on the device), or the AFIDs benchmark (built on first use).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from locnet_jax import augment as augment_lib
from locnet_jax import checkpoints as checkpoints_lib
from locnet_jax import device_augment, inference, io, losses, parallel, pipeline, reporting, resident, synthetic, training
from locnet_jax.datasets import afids
from locnet_jax.models import HeatmapUNet, MultiScaleLocNet, single_scale_locnet

MODEL_KINDS = ("multiscale", "single_scale", "heatmap")
SCHEDULES = ("paper", "multistep")
AUGMENT_ON = ("auto", "host", "device")  # where training augmentation runs; "auto": host on CPUs, else device
DATA_ON = ("auto", "host", "device")  # where the training set lives (`resident`); "auto": see `choose_data_on`
RESIDENT_SHARE = 0.5  # "auto" keeps the training set on an accelerator if it takes at most this share of its memory
# may change between a run and its resumption (where the data live, how fast it runs)
RESUME_FREE = ("train.loader_workers", "train.data_on", "data.cache_dir", "model.unet.conv_impl",
               "model.patch_groups")


class ConfigError(ValueError):
  """A configuration that cannot run (the CLI prints it on one line)."""


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite; the run stopped without saving the bad state."""


def create_model(model_config: ml_collections.ConfigDict, *, num_landmarks: int, num_scales: int):
  """The model a config's `model` section describes (`num_scales` = pyramid levels in `data.spacings_mm`)."""
  unet = model_config.unet.to_dict()
  if model_config.kind == "multiscale":
    return MultiScaleLocNet(num_landmarks, num_scales=num_scales, patch_shape=(model_config.patch_size,) * 3,
                            unet=unet, com_kind=model_config.com_kind, noise_mm=model_config.noise_mm,
                            stop_gradient=model_config.stop_gradient,
                            patch_groups=model_config.get("patch_groups", 0))  # absent from older runs' configs
  if model_config.kind not in MODEL_KINDS:
    raise ConfigError(f"unsupported model.kind {model_config.kind!r}; supported: {MODEL_KINDS}")
  if num_scales != 1:
    raise ConfigError(f"model.kind={model_config.kind!r} reads one volume: data.spacings_mm must have one "
                      f"entry, got {num_scales}")
  if model_config.kind == "single_scale":
    return single_scale_locnet(num_landmarks, unet=unet, extra_levels=model_config.extra_levels,
                               com_kind=model_config.com_kind)
  return HeatmapUNet(num_landmarks, unet=unet)


def schedule(train_config: ml_collections.ConfigDict, epoch: int, *, num_scales: int):
  """(loss weights (S,), trainable mask (S,) or None) for `epoch`: the paper's schedule or multi-step."""
  if train_config.schedule == "paper":
    return losses.loss_weights(epoch, num_epochs=train_config.num_epochs, num_scales=num_scales), None
  if train_config.schedule == "multistep":
    try:
      onehot = losses.multistep_weights(epoch, num_epochs=train_config.num_epochs, num_scales=num_scales)
    except ValueError as e:
      raise ConfigError(f"train.schedule='multistep': {e}") from None
    return onehot, onehot
  raise ConfigError(f"unsupported train.schedule {train_config.schedule!r}; supported: {SCHEDULES}")


def resolve_augment_on(value: str) -> str:
  """"auto" -> "host" (the loader's worker processes) when JAX's default backend is the CPU, else "device"."""
  if value not in AUGMENT_ON:
    raise ConfigError(f"unsupported train.augment_on {value!r}; supported: {AUGMENT_ON}")
  if value == "auto":
    return "host" if jax.default_backend() == "cpu" else "device"
  return value


def make_train_step(config: ml_collections.ConfigDict):
  """The jitted step ``(state, batch, key, weights, trainable) -> (state, metrics)`` for the model kind."""
  if config.model.kind == "heatmap":
    def step(state, batch, key, weights, trainable):
      del weights, trainable  # one output, no schedule
      return training.heatmap_train_step(state, batch, key, sigma_mm=config.model.heatmap_sigma_mm,
                                         peak=config.model.heatmap_peak)
  else:
    def step(state, batch, key, weights, trainable):
      return training.train_step(state, batch, key, weights=weights, trainable=trainable)
  return jax.jit(step, donate_argnums=0)


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


def manifest_path(data_config, *, seed: int, log=print) -> Path:
  if data_config.source == "manifest":
    if not data_config.manifest:
      raise ConfigError("data.source='manifest' needs --config.data.manifest=PATH")
    return Path(data_config.manifest)
  folder = Path(data_config.afids_dir)
  if not (folder / "dataset.json").is_file():
    log(f"building the AFIDs benchmark in {folder} (once)")
    afids.build(folder, seed=seed, landmarks=tuple(n.strip() for n in data_config.afids_landmarks.split(",")),
                workers=cpu_workers(), log=lambda *_: None)
  return folder / "dataset.json"


def cpu_workers() -> int:
  return min(os.cpu_count() or 1, 8)


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
  manifest = io.load_manifest(manifest_path(data_config, seed=seed, log=log))
  settings = preprocess_settings(data_config)
  cache = Path(data_config.cache_dir) if data_config.cache_dir else manifest.path.parent / ".locnet_cache"
  cases = manifest.split("train") + manifest.split("val")
  pipeline.prepare_cases(cases, manifest.landmarks, settings, cache, workers=cpu_workers())  # once: cached
  train = [pipeline.CachedCase(case, manifest.landmarks, settings, cache) for case in manifest.split("train")]
  val = [pipeline.load_example(case, manifest.landmarks, settings, cache, check=False)
         for case in manifest.split("val")]
  log(f"data: {manifest.path} ({len(train)} train, {len(val)} val cases, {len(manifest.landmarks)} landmarks), "
      f"cache {cache}")
  return Data(train, val, manifest.landmarks, True)


def validation_errors(predict, params, cases: list[pipeline.Example], *, batch_size: int) -> np.ndarray:
  """Mean radial error (mm) per scale (S,) over the annotated landmarks of `cases`, no noise.

  `predict` is `inference.make_predict(model)` (made once, so it compiles once per run).
  """
  errors = []
  for i in range(0, len(cases), batch_size):
    batch = pipeline.collate(cases[i:i + batch_size])
    pred = np.asarray(predict(params, batch["volumes"], batch["affines"]))
    errors.append(np.linalg.norm(pred - np.asarray(batch["target_mm"])[:, None], axis=-1))  # (B, S, K)
  return np.nanmean(np.concatenate(errors), axis=(0, 2))


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_differences(saved: dict, config: dict, *, prefixes: tuple[str, ...] = ("",),
                       also_free: tuple[str, ...] = ()) -> list[str]:
  """'field: saved -> now' for every field under `prefixes` that differs (JSON-normalised), except
  `RESUME_FREE` and `also_free` ones. A field the saved config lacks (added to the code after the run started) is not a
  difference: the run is taken to have used its default."""
  old, new = _flat(saved), _flat(json.loads(json.dumps(config)))
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old)
          if k.startswith(prefixes) and k not in RESUME_FREE + also_free and old.get(k) != new.get(k)]


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _check_config(config: ml_collections.ConfigDict, *, num_scales: int) -> None:
  if config.train.noise and not (config.model.kind == "multiscale" and num_scales >= 2):
    raise ConfigError("train.noise=True needs model.kind='multiscale' with >= 2 scales (noise shifts the "
                      "finest crop); set --config.train.noise=False")
  if config.train.batch_size < 1 or config.train.num_epochs < 1:
    raise ConfigError("train.batch_size and train.num_epochs must be >= 1")
  on_host = resolve_augment_on(config.train.augment_on) == "host"
  if config.train.data_on not in DATA_ON:
    raise ConfigError(f"unsupported train.data_on {config.train.data_on!r}; supported: {DATA_ON}")
  if config.train.data_on == "device" and config.train.distributed:
    raise ConfigError("train.data_on='device' runs in a single process; set train.distributed=False")
  if config.train.data_on == "device" and config.train.augment and on_host and config.data.source != "synthetic":
    raise ConfigError("train.data_on='device' keeps the training set on the device, where the host's "
                      "augmentation cannot reach it: set --config.train.augment_on=device (or augment=False)")


def _summary(meta: dict, checkpoints: checkpoints_lib.Checkpoints) -> dict[str, Any]:
  return {**meta["record"], "best_checkpoint": str(checkpoints.best_path()),
          "best_epoch": meta["best_epoch"], "best_val_error_mm": meta["best_val_error_mm"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, log=print) -> dict[str, Any]:
  """Trains (or resumes) for `config.train.num_epochs` epochs in `workdir`.

  Returns the last epoch's record with ``best_checkpoint`` (path), ``best_epoch`` and
  ``best_val_error_mm`` (validation error of the finest scale, which picks the best checkpoint).
  Raises `ConfigError`, `io.DataError` or `TrainingDiverged` (after which the latest checkpoint is the
  last good state).
  """
  if config.train.distributed:
    jax.distributed.initialize()  # cluster found from the environment (SLURM, Open MPI, TPU, or JAX_* vars)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  num_scales = len(config.data.spacings_mm)
  _check_config(config, num_scales=num_scales)
  config_dict = _config_dict(config)
  with checkpoints_lib.Checkpoints(workdir / "checkpoints") as checkpoints:
    saved = checkpoints.read_meta()
    if saved is not None:
      differences = config_differences(saved["config"], config_dict)
      if differences:
        raise ConfigError(f"{workdir} holds a run started with another config ({'; '.join(differences)}); "
                          "rerun with the same config to resume, or use a new --workdir")
      if saved["record"]["epoch"] + 1 >= config.train.num_epochs:
        log(f"{workdir}: already trained for {config.train.num_epochs} epochs")
        return _summary(saved, checkpoints)
    data = load_data(config.data, seed=config.seed, log=log)
    model = create_model(config.model, num_landmarks=len(data.names), num_scales=num_scales)
    mesh = parallel.data_mesh(batch_size=config.train.batch_size)
    root = jax.random.key(config.seed)
    example = pipeline.collate(data.val[:1])
    state = training.create_train_state(model, key=jax.random.fold_in(root, 0), volumes=example["volumes"],
                                        affines=example["affines"], learning_rate=config.train.learning_rate)
    state = parallel.replicate(state, mesh)
    first_epoch, step, meta = 0, 0, None
    if saved is not None:
      restored = checkpoints.restore_latest(state)
      state, first_epoch, meta = restored.state, restored.epochs_done, restored.meta
      step = meta["step"]
      log(f"resuming from {checkpoints.latest_path()} (epoch {first_epoch}, step {step})")
    reporting.rewind_metrics(workdir / "metrics.jsonl", epochs_done=first_epoch,
                             last_record=meta["record"] if meta else None)
    io.atomic_write(workdir / "config.json", json.dumps(config_dict, indent=2) + "\n")
    meta = _train_epochs(config, workdir, checkpoints, data=data, model=model, state=state, mesh=mesh, root=root,
                         first_epoch=first_epoch, step=step, meta=meta, log=log)
    return _summary(meta, checkpoints)


def choose_data_on(value: str, *, host_augment: bool, backend: str, processes: int, bytes_limit: int | None,
                   need_bytes) -> str:
  """Where the training set lives: `value` unless "auto", which picks "device" on an accelerator (not the
  CPU, whose loader workers run beside the step) when no augmentation is left to the host, the run is one
  process, and the set (`need_bytes()`, called only then) takes at most `RESIDENT_SHARE` of `bytes_limit`."""
  if value != "auto":
    return value
  if host_augment or backend == "cpu" or processes > 1 or not bytes_limit:
    return "host"
  return "device" if need_bytes() <= RESIDENT_SHARE * bytes_limit else "host"


def _training_batches(config, data: Data, *, mesh, host_augment, log):
  """The epoch batches: `resident.ResidentData` (training set on the device) or `pipeline.Loader`."""
  storage = "float16" if data.from_files else "float32"  # the cache stores float16: nothing is lost

  def need_bytes():
    first = data.train[0] if isinstance(data.train[0], pipeline.Example) else data.train[0]()
    return len(data.train) * sum(v.size for v in first.pyramid.volumes) * np.dtype(storage).itemsize

  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  where = choose_data_on(config.train.data_on, host_augment=host_augment is not None, backend=jax.default_backend(),
                         processes=jax.process_count(), bytes_limit=limit, need_bytes=need_bytes)
  if where == "device":
    batches = resident.ResidentData(data.train, batch_size=config.train.batch_size, seed=config.seed, mesh=mesh,
                                    storage_dtype=storage)
    log(f"training set on the device: {batches.nbytes / 1e9:.2f} GB" + (f" of {limit / 1e9:.1f}" if limit else ""))
    return batches
  if config.train.data_on == "auto" and host_augment is None and jax.default_backend() != "cpu":
    log("train.data_on='auto': the training set stays on the host (see choose_data_on)")
  return pipeline.Loader(data.train, batch_size=config.train.batch_size, seed=config.seed, augment=host_augment,
                         workers=config.train.loader_workers if data.from_files else 0)


def _train_epochs(config, workdir: Path, checkpoints, *, data: Data, model, state, mesh, root, first_epoch: int,
                  step: int, meta: dict | None, log) -> dict:
  """The epoch loop from `first_epoch`; returns the last checkpoint's metadata."""
  num_scales, epochs = len(config.data.spacings_mm), config.train.num_epochs
  step_fn = make_train_step(config)
  predict = inference.make_predict(model)
  noise_root = jax.random.fold_in(root, 1)
  best_error = meta["best_val_error_mm"] if meta else float("inf")
  best_epoch = meta["best_epoch"] if meta else None
  augment = augment_lib.AugmentSettings() if (config.train.augment and data.from_files) else None
  on_device = augment is not None and resolve_augment_on(config.train.augment_on) == "device"
  augment_fn = jax.jit(functools.partial(device_augment.augment_batch, settings=augment)) if on_device else None
  augment_root = jax.random.fold_in(root, 2)
  loader = _training_batches(config, data, mesh=mesh, host_augment=None if on_device else augment, log=log)
  progress = reporting.Progress(num_epochs=epochs, steps_per_epoch=loader.steps_per_epoch(),
                                first_epoch=first_epoch)
  with loader, reporting.MetricsLog(workdir, purge_step=step if step else None) as metrics_log:
    for epoch in range(first_epoch, epochs):
      start = time.perf_counter()
      weights, trainable = schedule(config.train, epoch, num_scales=num_scales)
      epoch_loss = []

      def consume(metrics, index, at_step):  # reads a step's metrics one step late: the device stays busy
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          last = checkpoints.latest_path()
          raise TrainingDiverged(
              f"non-finite training loss ({loss}) at epoch {epoch + 1}, step {at_step}; stopped. "
              + (f"The last good checkpoint is {last}; " if last else "No checkpoint was saved yet; ")
              + "lower train.learning_rate or check the data, and use a new --workdir")
        epoch_loss.append(loss)
        metrics_log.scalars(at_step, {"train/step_loss": loss})
        progress.step(epoch=epoch, step_in_epoch=index + 1, loss=loss)

      pending = None
      for index, batch in enumerate(loader.epoch(epoch)):
        key = jax.random.fold_in(noise_root, step) if config.train.noise else None
        if isinstance(loader, pipeline.Loader):  # resident batches are already on the mesh
          batch = parallel.shard_batch(batch, mesh)
        if augment_fn is not None:  # on the device, keyed by the step: a resumed run replays it
          batch = augment_fn(batch, jax.random.fold_in(augment_root, step))
        state, metrics = step_fn(state, batch, key, weights, trainable)
        step += 1
        if pending is not None:
          consume(*pending)
        pending = (metrics, index, step)
      consume(*pending)
      val_error = validation_errors(predict, state.params, data.val, batch_size=config.train.batch_size)
      finest = float(val_error[-1])
      is_best = finest < best_error
      if is_best:
        best_error, best_epoch = finest, epoch
      record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(epoch_loss)),
                "loss_weights": [round(float(w), 4) for w in np.asarray(weights)],
                "val_error_mm": [round(float(e), 4) for e in val_error], "best": is_best,
                "epoch_s": round(time.perf_counter() - start, 2)}
      if trainable is not None:
        record["trainable"] = np.asarray(trainable).astype(int).tolist()
      meta = {"record": record, "step": step, "best_val_error_mm": best_error, "best_epoch": best_epoch,
              "landmarks": list(data.names), "config": _config_dict(config)}
      checkpoints.save(epoch + 1, state, meta, is_best=is_best)
      metrics_log.epoch(record)
      errors = " / ".join(f"{e:.2f}" for e in record["val_error_mm"])
      progress.epoch_line(f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.2f}  val error (coarse to "
                          f"fine) {errors} mm{'  *best' if is_best else ''}  {record['epoch_s']:.0f} s",
                          val_error_mm=finest)
  return meta
