"""The training loop behind `train.py`: schedule, epochs, validation, checkpoints, metrics.

The model and data come from the config through `from_config`; the step from `train.step`.

A run's folder (``--workdir``) holds ``config.json``, ``metrics.jsonl`` (one JSON object per epoch),
``tensorboard/`` event files and ``checkpoints/{latest,best}`` (`train.checkpoints`). Running the
same command again resumes from the latest checkpoint and continues exactly as if never stopped: the
data order and host augmentation derive from (seed, epoch, case), the noise key and device augmentation
(`train.augment_on`) from (seed, step), and the
state (parameters, Adam moments, step) is restored bit for bit. A workdir refuses a config that differs
from the one it was started with (except `from_config.RESUME_FREE` fields, which do not change the results).

Data: synthetic cases in memory, a data set in the docs/data_format.md form (preprocessed once into the pyramid cache,
augmented by background workers or on the device), or the AFIDs benchmark (built on first use).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from locnet_jax import from_config, io, parallel
from locnet_jax.data import augment_device, augment_host, loader, resident
from locnet_jax.from_config import ConfigError, Data
from locnet_jax.model import inference, losses
from locnet_jax.train import checkpoints as checkpoints_lib
from locnet_jax.train import reporting, steps

SCHEDULES = ("paper", "multistep", "flat")
AUGMENT_ON = ("auto", "host", "device")  # where training augmentation runs; "auto": host on CPUs, else device
DATA_ON = ("auto", "host", "device")  # where the training set lives (`resident`); "auto": see `choose_data_on`
RESIDENT_SHARE = 0.5  # "auto" keeps the training set on an accelerator if it takes at most this share of its memory


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite; the run stopped without saving the bad state."""


def schedule(train_config: ml_collections.ConfigDict, epoch: int, *, num_scales: int):
  """(loss weights (S,), trainable mask (S,) or None) for `epoch`: the paper's schedule, multi-step, or
  flat (every scale weight 1 in every epoch: fine-tuning a trained chain, whose scales all must adapt)."""
  if train_config.schedule == "flat":
    return jax.numpy.ones((num_scales,), jax.numpy.float32), None
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
      return steps.heatmap_train_step(state, batch, key, sigma_mm=config.model.heatmap_sigma_mm,
                                         peak=config.model.heatmap_peak)
  else:
    half = patch_half_mm(config) if config.train.get("loss_in_patch_only", False) else None
    shift_root = (jax.random.fold_in(jax.random.key(config.seed), 3)  # (seed, step): a resumed run replays it
                  if tuple(config.model.get("train_shift_mm", ())) else None)

    def step(state, batch, key, weights, trainable):
      return steps.train_step(state, batch, key, weights=weights, trainable=trainable,
                              presence_weight=config.train.get("presence_weight", 1.0), patch_half_mm=half,
                              shift_root=shift_root)
  return jax.jit(step, donate_argnums=0)


def patch_half_mm(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """Per scale (S,), the half-width (mm per world axis) of its input patch: inf for the coarsest scale (the
  whole volume), ``patch_size * spacing / 2`` for each finer one."""
  spacings = tuple(config.data.spacings_mm)
  return (float("inf"),) + tuple(config.model.patch_size * s / 2 for s in spacings[1:])


def validation_errors(predict, params, cases: list[loader.Example], *, batch_size: int) -> np.ndarray:
  """Mean radial error (mm) per scale (S,) over the annotated landmarks of `cases`, no noise.

  `predict` is `inference.make_predict(model)` (made once, so it compiles once per run).
  """
  errors = []
  for i in range(0, len(cases), batch_size):
    batch = loader.collate(cases[i:i + batch_size])
    pred = np.asarray(predict(params, batch["volumes"], batch["affines"]))
    errors.append(np.linalg.norm(pred - np.asarray(batch["target_mm"])[:, None], axis=-1))  # (B, S, K)
  return np.nanmean(np.concatenate(errors), axis=(0, 2))


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
  host_only = augment_host.host_only_fields(from_config.augment_settings(config.train))
  if config.train.augment and not on_host and host_only and config.data.source != "synthetic":
    raise ConfigError(f"train.augmentation fields {host_only} run on the host only: set "
                      "--config.train.augment_on=host (or leave them at their defaults)")
  if config.model.get("presence", False) and config.model.kind != "multiscale":
    raise ConfigError("model.presence=True needs model.kind='multiscale'")


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
  from_config.validate(config)
  num_scales = len(config.data.spacings_mm)
  _check_config(config, num_scales=num_scales)
  workdir.mkdir(parents=True, exist_ok=True)
  config_dict = from_config.config_dict(config)
  lock = checkpoints_lib.WorkdirLock(workdir, log=log) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, checkpoints_lib.Checkpoints(workdir / "checkpoints") as checkpoints:
    saved = checkpoints.read_meta()
    if saved is not None:
      differences = from_config.config_differences(saved["config"], config_dict)
      if differences:
        raise ConfigError(f"{workdir} holds a run started with another config ({'; '.join(differences)}); "
                          "rerun with the same config to resume, or use a new --workdir")
      if saved["record"]["epoch"] + 1 >= config.train.num_epochs:
        log(f"{workdir}: already trained for {config.train.num_epochs} epochs")
        return _summary(saved, checkpoints)
    data = from_config.load_data(config.data, seed=config.seed, log=log, batch_size=config.train.batch_size)
    model = from_config.create_model(config.model, num_landmarks=len(data.names), num_scales=num_scales)
    mesh = parallel.data_mesh(batch_size=config.train.batch_size)
    root = jax.random.key(config.seed)
    example = loader.collate(data.val[:1])
    steps_per_epoch = len(data.train) // config.train.batch_size
    state = steps.create_train_state(model, key=jax.random.fold_in(root, 0), volumes=example["volumes"],
                                        affines=example["affines"], learning_rate=steps.learning_rate(
                                            config.train.learning_rate, schedule=config.train.lr_schedule,
                                            total_steps=config.train.num_epochs * steps_per_epoch,
                                            warmup_steps=config.train.get("warmup_epochs", 0) * steps_per_epoch))
    if saved is None and config.train.init_from:
      params, fresh, skip = state.params, None, tuple(comma_separated(config.train.get("init_skip", "")))
      for source in comma_separated(config.train.init_from):  # each fills what the ones before it lacked
        params, fresh = checkpoints_lib.warm_start(params, source, landmarks=data.names, only=fresh, skip=skip)
        log(f"starting from {source}" + (f" (new: {path_summary(fresh)})" if fresh else ""))
      state = state.replace(params=params)
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


def path_summary(paths: list[str]) -> str:
  """Parameter paths for a log line: each module (a leaf's path without its name, at most two parts) once,
  with how many leaves under it, e.g. "presence (2), scale3/unet (54)"."""
  counts: dict[str, int] = {}
  for path in paths:
    module = "/".join(path.split("/")[:-1][:2]) or path
    counts[module] = counts.get(module, 0) + 1
  return ", ".join(f"{module} ({count})" for module, count in sorted(counts.items()))


def comma_separated(text: str) -> list[str]:
  """The entries of a comma-separated config string (`train.init_from`'s model folders, `train.init_skip`'s
  parameter paths), in order."""
  return [part.strip() for part in text.split(",") if part.strip()]


def _training_batches(config, data: Data, *, mesh, host_augment, log):
  """The epoch batches: `resident.ResidentData` (training set on the device) or `loader.Loader`."""
  storage = "float16" if data.from_files else "float32"  # the cache stores float16: nothing is lost

  def need_bytes():
    first = data.train[0] if isinstance(data.train[0], loader.Example) else data.train[0]()
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
  workers = config.train.loader_workers if data.from_files else 0
  if workers and (freed := loader.sweep_orphaned_blocks()):
    log(f"freed {freed / 1e6:.0f} MB of shared memory left by killed runs ({loader.SHM_DIR}/{loader.SHM_PREFIX}*)")
  return loader.Loader(data.train, batch_size=config.train.batch_size, seed=config.seed, augment=host_augment,
                       workers=workers)


def _train_epochs(config, workdir: Path, checkpoints, *, data: Data, model, state, mesh, root, first_epoch: int,
                  step: int, meta: dict | None, log) -> dict:
  """The epoch loop from `first_epoch`; returns the last checkpoint's metadata."""
  num_scales, epochs = len(config.data.spacings_mm), config.train.num_epochs
  step_fn = make_train_step(config)
  predict = inference.make_predict(model)
  noise_root = jax.random.fold_in(root, 1)
  best_error = meta["best_val_error_mm"] if meta else float("inf")
  best_epoch = meta["best_epoch"] if meta else None
  augment = None
  if config.train.augment and data.from_files:
    augment = from_config.augment_settings(config.train, outside_value=config.data.get("outside_value", 0.0))
  on_device = augment is not None and resolve_augment_on(config.train.augment_on) == "device"
  augment_fn = jax.jit(functools.partial(augment_device.augment_batch, settings=augment)) if on_device else None
  augment_root = jax.random.fold_in(root, 2)
  batches = _training_batches(config, data, mesh=mesh, host_augment=None if on_device else augment, log=log)
  host = parallel.host_description()  # in every epoch record: a resumed run may change machines
  progress = reporting.Progress(num_epochs=epochs, steps_per_epoch=batches.steps_per_epoch(),
                                first_epoch=first_epoch)
  with batches, reporting.MetricsLog(workdir, purge_step=step if step else None) as metrics_log:
    for epoch in range(first_epoch, epochs):
      start = time.perf_counter()
      weights, trainable = schedule(config.train, epoch, num_scales=num_scales)
      epoch_loss, epoch_bce = [], []

      def consume(metrics, index, at_step):  # reads a step's metrics one step late: the device stays busy
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          last = checkpoints.latest_path()
          raise TrainingDiverged(
              f"non-finite training loss ({loss}) at epoch {epoch + 1}, step {at_step}; stopped. "
              + (f"The last good checkpoint is {last}; " if last else "No checkpoint was saved yet; ")
              + "lower train.learning_rate or check the data, and use a new --workdir")
        epoch_loss.append(loss)
        if "presence_bce" in metrics:
          epoch_bce.append(float(metrics["presence_bce"]))
        metrics_log.scalars(at_step, {"train/step_loss": loss})
        progress.step(epoch=epoch, step_in_epoch=index + 1, loss=loss)

      pending = None
      for index, batch in enumerate(batches.epoch(epoch)):
        key = jax.random.fold_in(noise_root, step) if config.train.noise else None
        if isinstance(batches, loader.Loader):  # resident batches are already on the mesh
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
      # the last epoch is the best if no epoch was (non-finite validation errors): a run always ends with a best
      is_best = finest < best_error or (epoch == epochs - 1 and checkpoints.best_path() is None)
      if is_best:
        best_error, best_epoch = finest, epoch
      record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(epoch_loss)),
                "loss_weights": [round(float(w), 4) for w in np.asarray(weights)],
                "val_error_mm": [round(float(e), 4) for e in val_error], "best": is_best,
                "epoch_s": round(time.perf_counter() - start, 2), "host": host}
      if epoch_bce:  # how well the presence output fits the training crops
        record["train_presence_bce"] = round(float(np.mean(epoch_bce)), 4)
      if trainable is not None:
        record["trainable"] = np.asarray(trainable).astype(int).tolist()
      meta = {"record": record, "step": step, "best_val_error_mm": best_error, "best_epoch": best_epoch,
              "landmarks": list(data.names), "config": from_config.config_dict(config)}
      checkpoints.save(epoch + 1, state, meta, is_best=is_best)
      metrics_log.epoch(record)
      errors = " / ".join(f"{e:.2f}" for e in record["val_error_mm"])
      bce = f"  presence BCE {record['train_presence_bce']:.3f}" if epoch_bce else ""
      progress.epoch_line(f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.2f}{bce}  val error (coarse to "
                          f"fine) {errors} mm{'  *best' if is_best else ''}  {record['epoch_s']:.0f} s",
                          val_error_mm=finest)
  return meta
