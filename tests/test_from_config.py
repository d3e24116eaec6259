"""The one config-to-object module: a trained run's model must match the config that evaluates it."""


import pytest

from locnet_jax import from_config


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
  assert set(config.train.augmentation) == {f.name for f in dataclasses.fields(augment_host.AugmentSettings)}
  assert from_config.augment_settings(config.train) == augment_host.AugmentSettings()
  varied = from_config.augment_settings(multiscale.get_config("afids6").train)
  assert varied.deform_mm > 0 and varied.fov_probability > 0 and varied.lut_probability > 0
  assert set(augment_host.host_only_fields(varied)) >= {"deform_mm", "fov_probability", "lut_probability"}
  config.train.augmentation.unlock()
  config.train.augmentation.warp = 1.0
  with pytest.raises(from_config.ConfigError, match=r"unknown train.augmentation fields \['warp'\]"):
    from_config.augment_settings(config.train)


def test_host_only_variation_cannot_run_on_the_device():
  from configs import multiscale
  from locnet_jax.train import loop
  config = multiscale.get_config("afids6")
  loop._check_config(config, num_scales=3)  # on the host: fine
  config.train.augment_on = "device"
  with pytest.raises(from_config.ConfigError, match=r"run on the host only.*augment_on=host"):
    loop._check_config(config, num_scales=3)
  config = multiscale.get_config("afids6")
  config.model.kind = "single_scale"
  config.train.noise = False
  with pytest.raises(from_config.ConfigError, match="presence=True needs model.kind='multiscale'"):
    loop._check_config(config, num_scales=3)
