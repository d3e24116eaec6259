"""Turns a config (configs/default.py) into objects: the model, the data, the preprocessing settings.

The one place where a config is unpacked for the library: training (`train.loop`), evaluation
(`eval.evaluate`), prediction and export all build their model, landmark names, cache folder and
cases here, so they agree by construction. Library code below takes explicit arguments.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from locnet_jax import dataset, io, parallel
from locnet_jax.data import afids, augment_host, loader, preprocess, synthetic
from locnet_jax.model.locnet import HeatmapUNet, MultiScaleLocNet, PresenceEncoder, single_scale_locnet
from locnet_jax.model.unet import UNet3D

MODEL_KINDS = ("multiscale", "single_scale", "heatmap")
DATA_SOURCES = ("synthetic", "manifest", "afids")
# may change between a run and its resumption (where the data live, how fast it runs)
RESUME_FREE = ("train.loader_workers", "train.data_on", "data.cache_dir", "model.unet.conv_impl",
               "model.patch_groups")
INFERENCE_FREE = ("model.unet.dtype",)  # may differ from training when evaluating (bfloat16 on a GPU, say)
PYRAMID_FIELDS = ("data.spacings_mm", "data.finest_size", "data.intensity", "data.ct_window_hu")
SYNTHETIC_VAL_SEED_OFFSET = 1_000_003  # validation cases of `data.source='synthetic'` never equal training ones


class ConfigError(ValueError):
  """A configuration that cannot run (the CLI prints it on one line)."""


def create_model(model_config: ml_collections.ConfigDict, *, num_landmarks: int, num_scales: int):
  """The model a config's `model` section describes (`num_scales` = pyramid levels in `data.spacings_mm`)."""
  unet = model_config.unet.to_dict()
  if model_config.kind == "multiscale":
    return MultiScaleLocNet(num_landmarks, num_scales=num_scales, patch_shape=(model_config.patch_size,) * 3,
                            unet=unet, com_kind=model_config.com_kind, noise_mm=model_config.noise_mm,
                            stop_gradient=model_config.stop_gradient,
                            patch_groups=model_config.get("patch_groups", 0),  # absent from older runs' configs
                            presence=model_config.get("presence", False),
                            presence_from=model_config.get("presence_from", "mass"),
                            coarse_unet={"depth": model_config.coarse_depth} if model_config.get("coarse_depth") else None,
                            coarse_com_kind=model_config.get("coarse_com_kind") or None,
                            finest_unet=({"base_channels": model_config.finest_channels}
                                         if model_config.get("finest_channels") else None),
                            landmark_film=model_config.get("landmark_film", False),
                            landmark_offset=model_config.get("landmark_offset", False),
                            train_shift_mm=tuple(model_config.get("train_shift_mm", ())))
  if model_config.kind not in MODEL_KINDS:
    raise ConfigError(f"unsupported model.kind {model_config.kind!r}; supported: {MODEL_KINDS}")
  if num_scales != 1:
    raise ConfigError(f"model.kind={model_config.kind!r} reads one volume: data.spacings_mm must have one "
                      f"entry, got {num_scales}")
  if model_config.kind == "single_scale":
    return single_scale_locnet(num_landmarks, unet=unet, extra_levels=model_config.extra_levels,
                               com_kind=model_config.com_kind)
  return HeatmapUNet(num_landmarks, unet=unet)


def augment_settings(train_config: ml_collections.ConfigDict, *, outside_value: float = 0.0
                     ) -> augment_host.AugmentSettings:
  """The augmentation a config's `train.augmentation` draws (defaults for fields an older config lacks), on
  pyramids whose outside is `outside_value` (the config's `data.outside_value`)."""
  fields = {f.name for f in dataclasses.fields(augment_host.AugmentSettings)}
  given = train_config.get("augmentation")
  given = given.to_dict() if given is not None else {}
  unknown = sorted(set(given) - (fields - {"outside_value"}))  # outside_value: data.outside_value
  if unknown:
    raise ConfigError(f"unknown train.augmentation fields {unknown}; known: {sorted(fields)}")
  values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(given).items()}
  return augment_host.AugmentSettings(**values, outside_value=float(outside_value))


def _require(ok: bool, field: str, value, rule: str) -> None:
  if not ok:
    raise ConfigError(f"{field}={value!r}: {rule}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Every field checked up front, before any work: one `ConfigError` naming the field and the rule."""
  d, m, t, e = config.data, config.model, config.train, config.eval
  _require(d.source in DATA_SOURCES, "data.source", d.source, f"one of {DATA_SOURCES}")
  _require(not (d.manifest and d.source != "manifest"), "data.manifest", d.manifest,
           f"is only read with data.source='manifest' (now {d.source!r}): set --config.data.source=manifest")
  spacings = tuple(d.spacings_mm)
  try:
    preprocess.check_spacings(spacings)
  except ValueError as error:
    raise ConfigError(f"data.spacings_mm={spacings!r}: {error}") from None
  levels = [d.finest_size // 2 ** s for s in range(len(spacings))]
  _require(isinstance(d.finest_size, int) and d.finest_size >= 1 and d.finest_size % 2 ** (len(spacings) - 1) == 0,
           "data.finest_size", d.finest_size, f"a positive multiple of 2**(levels - 1) = {2 ** (len(spacings) - 1)}")
  _require(m.kind in MODEL_KINDS, "model.kind", m.kind, f"one of {MODEL_KINDS}")
  factor = 2 ** (m.unet.depth + (m.extra_levels if m.kind == "single_scale" else 0))
  _require(levels[-1] % factor == 0, "data.finest_size", d.finest_size,
           f"the coarsest level ({levels[-1]} voxels) must be divisible by 2**(U-Net depth) = {factor}")
  coarse_depth = m.get("coarse_depth") or m.unet.depth
  _require(isinstance(coarse_depth, int) and coarse_depth >= 1 and levels[-1] % 2 ** coarse_depth == 0,
           "model.coarse_depth", coarse_depth, f"0, or an int >= 1 with the coarsest level ({levels[-1]} voxels) "
           "divisible by 2**coarse_depth")
  finest_channels = m.get("finest_channels", 0)
  _require(isinstance(finest_channels, int) and finest_channels >= 0, "model.finest_channels", finest_channels,
           "0 (unet.base_channels) or an int >= 1")
  _require(not m.get("landmark_film") or (m.kind == "multiscale" and len(spacings) > 1), "model.landmark_film",
           m.get("landmark_film"), "conditions the finer scales: needs model.kind='multiscale' and 2+ spacings")
  if m.get("presence") and m.get("presence_from", "mass") == "image":
    pooled = 2 ** len(PresenceEncoder.channels)  # its classifier halves the grid once per level
    _require(levels[-1] % pooled == 0, "model.presence_from", "image",
             f"a coarsest level divisible by {pooled}, got {levels[-1]} voxels")
  if m.kind == "multiscale" and len(spacings) > 1:
    _require(isinstance(m.patch_size, int) and m.patch_size >= 1 and m.patch_size % factor == 0, "model.patch_size",
             m.patch_size, f"a positive multiple of 2**unet.depth = {factor}")
  try:
    create_model(m, num_landmarks=1, num_scales=len(spacings))
    UNet3D(out_channels=1, **m.unet.to_dict())  # its own checks (norm, activation, sizes...)
  except ValueError as error:
    raise ConfigError(f"model: {error}") from None
  _require(np.isfinite(t.learning_rate) and t.learning_rate > 0, "train.learning_rate", t.learning_rate, "> 0")
  _require(t.get("lr_schedule", "constant") in ("constant", "cosine"), "train.lr_schedule", t.get("lr_schedule"), "'constant' or 'cosine'")
  warmup = t.get("warmup_epochs", 0)
  _require(isinstance(warmup, int) and 0 <= warmup < t.num_epochs and (warmup == 0 or t.get("lr_schedule") == "cosine"),
           "train.warmup_epochs", warmup, "an int in [0, train.num_epochs), non-zero only with train.lr_schedule='cosine'")
  for field, value, minimum in (("train.num_epochs", t.num_epochs, 1), ("train.batch_size", t.batch_size, 1),
                                ("train.loader_workers", t.loader_workers, 0), ("data.num_train", d.num_train, 1),
                                ("data.num_val", d.num_val, 1), ("eval.num_noise_samples", e.num_noise_samples, 0),
                                ("eval.chunk_size", e.chunk_size, 0)):
    _require(isinstance(value, int) and value >= minimum, field, value, f"an int >= {minimum}")
  _require(t.get("presence_weight", 1.0) >= 0, "train.presence_weight", t.get("presence_weight"), ">= 0")
  _require(isinstance(t.get("loss_in_patch_only", False), bool), "train.loss_in_patch_only",
           t.get("loss_in_patch_only"), "True or False")
  outside = d.get("outside_value", 0.0)
  _require(np.isfinite(outside) and outside <= 0, "data.outside_value", outside, "0, or < 0 to mark the outside")
  _require(outside == 0 or d.intensity != "none", "data.outside_value", outside,
           "a marker needs normalised images (data.intensity 'mr' or 'ct'), not 'none'")
  augment_settings(t)


def preprocess_settings(data_config: ml_collections.ConfigDict) -> loader.PreprocessSettings:
  """The pyramid a config's `data` section asks for."""
  return loader.PreprocessSettings(spacings_mm=tuple(data_config.spacings_mm), finest_size=data_config.finest_size,
                                   intensity=data_config.intensity, ct_window_hu=tuple(data_config.ct_window_hu),
                                   outside_value=float(data_config.get("outside_value", 0.0)))


def afids_landmarks(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return afids.parse_names(data_config.afids_landmarks)


def manifest_path(data_config: ml_collections.ConfigDict, *, seed: int, log=print) -> Path:
  """The data set's `dataset.json`; the AFIDs benchmark is built on first use."""
  if data_config.source == "manifest":
    if not data_config.manifest:
      raise ConfigError("data.source='manifest' needs --config.data.manifest=PATH")
    return Path(data_config.manifest)
  if data_config.source != "afids":
    raise ConfigError(f"data.source={data_config.source!r} has no manifest; supported: ('manifest', 'afids')")
  folder = Path(data_config.afids_dir)
  wanted = afids_landmarks(data_config)
  if not (folder / "dataset.json").is_file():
    log(f"building the AFIDs benchmark in {folder} (once)")
    afids.build(folder, seed=seed, landmarks=wanted, workers=parallel.cpu_workers(), log=lambda *_: None)
  held = dataset.load_manifest(folder / "dataset.json").landmarks
  if tuple(held) != tuple(wanted):  # a set built for other AFIDs would silently train another model
    raise ConfigError(f"data.afids_dir={str(folder)!r} holds the AFIDs {','.join(held)}, the config asks for "
                      f"data.afids_landmarks={','.join(wanted)}: point data.afids_dir at another folder (built "
                      "there on first use) or build it with python -m locnet_jax.data.afids --out DIR --landmarks ...")
  return folder / "dataset.json"


def data_recipe(data_config: ml_collections.ConfigDict, *, seed: int) -> dict:
  """What a model card records of the data a model was trained on: the data set's name (the AFIDs
  builder's names its template and seed), its manifest (relative to the working directory when inside it:
  a card travels) and its cases per split; synthetic data, its seed and counts."""
  if data_config.source == "synthetic":
    return {"source": "synthetic", "seed": seed, "cases": {"train": data_config.num_train, "val": data_config.num_val}}
  manifest = dataset.load_manifest(manifest_path(data_config, seed=seed, log=lambda *_: None))
  return {"source": data_config.source, "name": manifest.name, "manifest": io.portable_path(manifest.path),
          "cases": {split: sum(case.split == split for case in manifest.cases) for split in dataset.SPLITS}}


def cache_dir(data_config: ml_collections.ConfigDict, manifest: dataset.Manifest) -> Path:
  """The pyramid cache: `data.cache_dir`, else `.locnet_cache` beside the manifest."""
  return Path(data_config.cache_dir) if data_config.cache_dir else manifest.path.parent / ".locnet_cache"


def landmark_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The landmark names a run trained on, from its data config (checkpoints also store them)."""
  if data_config.source == "synthetic":
    return tuple(f"L{k}" for k in range(data_config.num_landmarks))
  if data_config.source == "afids":
    manifest = Path(data_config.afids_dir) / "dataset.json"
    if not manifest.is_file():
      return afids_landmarks(data_config)
    return dataset.load_manifest(manifest).landmarks
  return dataset.load_manifest(data_config.manifest).landmarks


def load_split(manifest: dataset.Manifest, split: str, settings: loader.PreprocessSettings,
               cache: Path) -> list[loader.Example]:
  """The examples of one split, their pyramids cached first (in parallel)."""
  cases = manifest.split(split)
  loader.prepare_cases(cases, manifest.landmarks, settings, cache, workers=parallel.cpu_workers())
  return [loader.load_example(c, manifest.landmarks, settings, cache, check=False) for c in cases]


@dataclasses.dataclass(frozen=True)
class Data:
  """What training reads: training sources (Examples or cached cases), validation Examples, names."""

  train: list
  val: list[loader.Example]
  names: tuple[str, ...]
  from_files: bool


def load_data(data_config: ml_collections.ConfigDict, *, seed: int, log=print, batch_size: int = 1) -> Data:
  """The config's training data: synthetic cases in memory, or a data set preprocessed once into the cache.
  Fewer training cases than `batch_size` is a `ConfigError`, raised before any preprocessing."""
  if data_config.source == "synthetic":
    if data_config.num_train < batch_size:
      raise ConfigError(f"train.batch_size={batch_size} exceeds data.num_train={data_config.num_train}")
    kwargs = dict(spacings_mm=tuple(data_config.spacings_mm), finest_size=data_config.finest_size,
                  num_landmarks=data_config.num_landmarks)
    return Data(synthetic.make_cases(seed, data_config.num_train, **kwargs),
                synthetic.make_cases(seed + SYNTHETIC_VAL_SEED_OFFSET, data_config.num_val, **kwargs),
                landmark_names(data_config), False)
  if data_config.source not in DATA_SOURCES:
    raise ConfigError(f"unsupported data.source {data_config.source!r}; supported: {DATA_SOURCES}")
  manifest = dataset.load_manifest(manifest_path(data_config, seed=seed, log=log))
  if len(manifest.split("train")) < batch_size:
    raise ConfigError(f"train.batch_size={batch_size} exceeds the {len(manifest.split('train'))} training cases of "
                      f"{manifest.path}")
  settings = preprocess_settings(data_config)
  cache = cache_dir(data_config, manifest)
  loader.prepare_cases(manifest.split("train") + manifest.split("val"), manifest.landmarks, settings, cache,
                       workers=parallel.cpu_workers())  # once: cached
  train = [loader.CachedCase(case, manifest.landmarks, settings, cache) for case in manifest.split("train")]
  val = [loader.load_example(case, manifest.landmarks, settings, cache, check=False)
         for case in manifest.split("val")]
  log(f"data: {manifest.path} ({len(train)} train, {len(val)} val cases, {len(manifest.landmarks)} landmarks), "
      f"cache {cache}")
  return Data(train, val, manifest.landmarks, True)


def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (what `config.json` and checkpoints record)."""
  return json.loads(config.to_json_best_effort())


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


def check_model_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """The config's model and pyramid must be the ones the run in `workdir` was trained with (but
  `INFERENCE_FREE`): evaluation and prediction rebuild the model from the config."""
  saved_path = Path(workdir) / "config.json"
  if not saved_path.is_file():
    raise io.DataError(saved_path, "no such file: is this a training workdir?")
  saved = json.loads(saved_path.read_text())
  differences = config_differences(saved, config_dict(config), prefixes=("model.",) + PYRAMID_FIELDS,
                                   also_free=INFERENCE_FREE)
  if differences:
    raise ConfigError(f"{workdir} was trained with another model or pyramid ({'; '.join(differences)}): "
                      "pass the training config (and overrides) with --config")
