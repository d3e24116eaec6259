"""The one config-to-object module: a trained run's model must match the config that evaluates it."""


import pytest

from locnet_jax import from_config
from tests import helpers


def test_evaluation_may_change_the_compute_dtype_but_not_the_model(tmp_path):
  from configs import multiscale
  trained = multiscale.get_config("synthetic_demo")
  (tmp_path / "config.json").write_text(trained.to_json_best_effort())
  config = multiscale.get_config("synthetic_demo")
  config.model.unet.dtype = "bfloat16"  # same parameters, another compute dtype: allowed
  from_config.check_model_config(config, tmp_path)
  config.model.unet.base_channels += 1
  with pytest.raises(from_config.ConfigError, match=r"another model or pyramid \(model.unet.base_channels"):
    from_config.check_model_config(config, tmp_path)


def test_the_augmentation_section_declares_every_setting_with_its_default():
  import dataclasses

  from configs import default, multiscale
  from locnet_jax.data import augment_host
  config = default.get_config()
  assert set(config.train.augmentation) | {"outside_value"} == {f.name for f in
                                                                dataclasses.fields(augment_host.AugmentSettings)}
  assert from_config.augment_settings(config.train) == augment_host.AugmentSettings()
  marked = from_config.augment_settings(config.train, outside_value=-1.0)  # the data recipe's, not a draw
  assert marked.outside_value == -1.0 and marked == dataclasses.replace(augment_host.AugmentSettings(),
                                                                        outside_value=-1.0)
  recipe = multiscale.get_config("afids6_real")
  recipe.train.augmentation.fov_probability = 0.3  # crops are off in the recipe; the override turns them on
  varied = from_config.augment_settings(recipe.train)
  assert varied.deform_mm > 0 and varied.fov_probability == 0.3 and varied.lut_probability > 0
  assert augment_host.host_only_fields(varied) == []  # the device implements every variation
  assert augment_host.host_only_fields(augment_host.AugmentSettings(elastic_mm=2.0)) == ["elastic_mm"]
  # the finest region is the host's shortcut: a device run computes the whole grid instead of refusing
  every = from_config.augment_settings(multiscale.get_config("afids32").train)
  assert every.finest_margin_mm > 0 and augment_host.host_only_fields(every) == []
  config.train.augmentation.unlock()
  config.train.augmentation.warp = 1.0
  with pytest.raises(from_config.ConfigError, match=r"unknown train.augmentation fields \['warp'\]"):
    from_config.augment_settings(config.train)


def test_host_only_augmentation_cannot_run_on_the_device():
  from configs import multiscale
  from locnet_jax.train import loop
  config = multiscale.get_config("afids6_real")
  loop._check_config(config, num_scales=3)  # on the host: fine
  config.train.augment_on = "device"
  loop._check_config(config, num_scales=3)  # the variation runs on the device too
  config.train.augmentation.elastic_mm = 2.0  # the old mild elastic warp does not
  with pytest.raises(from_config.ConfigError, match=r"run on the host only.*augment_on=host"):
    loop._check_config(config, num_scales=3)
  config = multiscale.get_config("afids6_real")
  config.model.kind = "single_scale"
  config.model.presence = True
  config.train.noise = False
  with pytest.raises(from_config.ConfigError, match="presence=True needs model.kind='multiscale'"):
    loop._check_config(config, num_scales=3)


BAD_FIELDS = [
    ({"train.learning_rate": -1.0}, r"train.learning_rate=-1.0: > 0"),
    ({"train.warmup_epochs": 2}, r"train.warmup_epochs=2: .*non-zero only with train.lr_schedule='cosine'"),
    ({"eval.num_noise_samples": -5}, r"eval.num_noise_samples=-5: an int >= 0"),
    ({"eval.chunk_size": -1}, r"eval.chunk_size=-1: an int >= 0"),
    ({"data.num_val": 0}, r"data.num_val=0: an int >= 1"),
    ({"data.finest_size": 100}, r"data.finest_size=100: the coarsest level \(25 voxels\) must be divisible"),
    ({"data.finest_size": 129}, r"data.finest_size=129: a positive multiple of 2\*\*\(levels - 1\) = 4"),
    ({"model.patch_size": 0}, r"model.patch_size=0: a positive multiple"),
    ({"model.unet.norm": "batch"}, r"model: norm must be one of"),
    ({"data.manifest": "x.json"}, r"data.manifest='x.json': is only read with data.source='manifest'"),
    ({"data.spacings_mm": (8.0, 2.0)}, r"data.spacings_mm=\(8.0, 2.0\): spacings_mm must be .* each twice the next"),
    ({"data.outside_value": 0.5}, r"data.outside_value=0.5: 0, or < 0 to mark the outside"),
    ({"data.outside_value": -1.0, "data.intensity": "none"}, r"data.outside_value=-1.0: a marker needs normalised"),
    ({"model.coarse_depth": 6}, r"model.coarse_depth=6: .*coarsest level \(32 voxels\) divisible"),
    ({"model.finest_channels": -4}, r"model.finest_channels=-4: 0 \(unet.base_channels\) or an int >= 1"),
    ({"model.landmark_film": True, "data.spacings_mm": (2.0,)}, r"model.landmark_film=True: conditions the finer"),
    ({"model.train_shift_mm": (4.0, 2.0)}, r"model: train_shift_mm must hold one half-width >= 0 for each of the 1"),
    ({"model.coarse_com_kind": "max"}, r"model: coarse_com_kind must be one of"),
    ({"model.presence": True, "model.presence_from": "heatmap"}, r"model: presence_from must be one of"),
    ({"model.presence": True, "model.presence_from": "image", "data.finest_size": 48},
     r"model.presence_from='image': a coarsest level divisible by 8, got 12 voxels"),
]


@pytest.mark.parametrize("changes, message", BAD_FIELDS, ids=[list(c)[-1] for c, _ in BAD_FIELDS])
def test_every_field_is_checked_before_any_work(changes, message):
  from configs import multiscale
  config = multiscale.get_config("demo")
  from_config.validate(config)  # the demo itself is fine
  for key, value in changes.items():
    *path, name = key.split(".")
    section = config
    for part in path:
      section = section[part]
    section[name] = value
  with pytest.raises(from_config.ConfigError, match=message):
    from_config.validate(config)


def test_finest_channels_widen_the_finest_scale_only():
  from configs import multiscale
  config = multiscale.get_config("demo")
  assert from_config.create_model(config.model, num_landmarks=2, num_scales=3).finest_unet is None
  config.model.finest_channels = 24
  model = from_config.create_model(config.model, num_landmarks=2, num_scales=3)
  assert model.finest_unet == {"base_channels": 24} and model.unet["base_channels"] == 8


def test_a_batch_larger_than_the_training_set_is_refused_before_preprocessing(tmp_path):
  from tests import helpers
  manifest = helpers.tiny_dataset(tmp_path / "data", count=3)  # 2 train, 1 val
  config = helpers.tiny_file_config(manifest, tmp_path / "cache")
  with pytest.raises(from_config.ConfigError, match=r"train.batch_size=3 exceeds the 2 training cases of"):
    from_config.load_data(config.data, seed=0, log=lambda *_: None, batch_size=3)
  assert not (tmp_path / "cache").exists()  # nothing was preprocessed
  config.data.source = "synthetic"
  config.data.manifest = ""
  with pytest.raises(from_config.ConfigError, match=rf"train.batch_size=100 exceeds data.num_train={config.data.num_train}"):
    from_config.load_data(config.data, seed=0, log=lambda *_: None, batch_size=100)


def test_a_model_card_names_its_data_set_by_a_path_that_travels(tmp_path, monkeypatch):
  """`data_recipe`: the manifest relative to the working directory when inside it, else absolute; cases per
  split counted from the manifest."""
  from configs import multiscale
  from tests import helpers
  manifest = helpers.tiny_dataset(tmp_path / "sets" / "tiny", count=4, splits=["train", "train", "val", "test"])
  config = multiscale.get_config("synthetic_demo").data
  config.source, config.manifest = "manifest", str(manifest)
  monkeypatch.chdir(tmp_path)
  recipe = from_config.data_recipe(config, seed=0)
  assert recipe["manifest"] == "sets/tiny/dataset.json" and recipe["cases"] == {"train": 2, "val": 1, "test": 1}
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  assert from_config.data_recipe(config, seed=0)["manifest"] == str(manifest.resolve())
  config.source = "synthetic"
  assert from_config.data_recipe(config, seed=3) == {"source": "synthetic", "seed": 3,
                                                      "cases": {"train": config.num_train, "val": config.num_val}}


def test_an_afids_folder_built_for_other_landmarks_is_refused_not_trained_on(tmp_path):
  """data.source='afids' reads data.afids_dir as built; a set there with other landmarks than
  data.afids_landmarks is a ConfigError naming the folder and both lists (it would train another model)."""
  helpers.tiny_dataset(tmp_path / "afids")  # landmarks "A", "B"
  config = helpers.tiny_config()
  config.data.source, config.data.afids_dir, config.data.afids_landmarks = "afids", str(tmp_path / "afids"), "A,B"
  assert from_config.manifest_path(config.data, seed=0) == tmp_path / "afids" / "dataset.json"
  config.data.afids_landmarks = "A"
  with pytest.raises(from_config.ConfigError, match=r"holds the AFIDs A,B, the config asks for data.afids_landmarks=A:"):
    from_config.manifest_path(config.data, seed=0)
