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
