"""Every config builds its model, every Table-1 row runs a step, and the schedules are the paper's."""


import jax
import numpy as np
import pytest

from configs import heatmap_unet, multiscale, multistep, no_noise, single_scale
from locnet_jax import from_config
from locnet_jax.data import afids, loader
from locnet_jax.train import loop, steps


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
  tuned, scratch = multiscale.get_config("afids6_real_ft"), multiscale.get_config("afids6_real")
  assert (tuned.train.init_from, tuned.train.schedule, tuned.train.lr_schedule) == ("pretrained/afids6", "flat", "cosine")
  assert (scratch.train.init_from, scratch.train.schedule, scratch.train.lr_schedule) == ("", "paper", "cosine")
  # the variation without field-of-view crops (they held training back: docs/results.md)
  assert tuned.train.augmentation.fov_probability == scratch.train.augmentation.fov_probability == 0
  assert scratch.train.augmentation.lut_probability > 0 and scratch.train.augmentation.deform_mm > 0
  assert scratch.train.augmentation.fov_min_mm < tuned.train.augmentation.fov_min_mm
  assert not tuned.model.presence and not scratch.model.presence  # presence from the field of view (eval/qc.py)
  every = multiscale.get_config("afids32")
  draws = {**every.train.augmentation.to_dict(), "finest_margin_mm": 0.0}
  assert draws == scratch.train.augmentation.to_dict()  # the afids6_real recipe's draws
  # its 1 mm finest level computed only where the crops read: patch half-width + noise + the 2 mm scale's error
  assert every.train.augmentation.finest_margin_mm >= every.model.patch_size / 2 + every.model.noise_mm + 10
  assert (every.train.lr_schedule, every.train.augment_on) == ("cosine", "host")
  assert tuple(every.data.spacings_mm) == (8.0, 4.0, 2.0, 1.0) and every.data.finest_size == 256  # 256 mm at 1 mm
  assert from_config.landmark_names(every.data) == afids.AFID_NAMES and every.data.afids_dir != paper.data.afids_dir
  more = multiscale.get_config("afids32_more")  # continues the export with the same draws and data
  assert (more.train.init_from, more.train.schedule, more.train.lr_schedule) == ("pretrained/afids32", "flat", "cosine")
  assert more.train.augmentation.to_dict() == every.train.augmentation.to_dict() and more.data == every.data
  assert more.train.learning_rate < every.train.learning_rate and more.model.landmark_film and not every.model.landmark_film
  assert more.model.landmark_offset and not every.model.landmark_offset
  more_model = more.model.to_dict()
  more_model.update(landmark_film=False, landmark_offset=False)  # both zero at init: the export's function
  assert more_model == every.model.to_dict()  # otherwise the same model, so the export continues in it
  assert (every.train.warmup_epochs, more.train.warmup_epochs) == (0, 2)  # a continued run warms Adam up
  for config in (tuned, scratch, paper, every, more):
    from_config.validate(config)


TABLE_1 = {"heatmap_unet": heatmap_unet, "single_scale": single_scale, "multistep": multistep,
           "no_noise": no_noise, "multiscale": multiscale}


@pytest.mark.slow  # a whole model per config: 15-35 s each on 2 cores
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
    config.model.unet.base_channels, config.data.num_val, config.model.patch_groups = 2, 1, 1
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
