"""Test-time uncertainty: the noise passes in one call equal the loop of single noisy passes, in any chunking."""

import jax
import numpy as np
import pytest

from locnet_jax.model import inference
from locnet_jax.model.locnet import MultiScaleLocNet
from tests import helpers

HALF_WIDTH = helpers.PYRAMID_HALF_WIDTH_MM  # the scale of every prediction's rounding (helpers.random_pyramid)


@pytest.mark.parametrize("chunk_size", [pytest.param(0, marks=pytest.mark.slow), 1,  # 0: auto (1 on a CPU)
                                        pytest.param(3, marks=pytest.mark.slow), 7])  # slow: over 25 s
def test_uncertainty_in_one_call_equals_the_loop_of_single_passes(chunk_size):
  volumes, affines = helpers.random_pyramid(batch=2, seed=5, flip=(1, -1, 1))
  model = MultiScaleLocNet(2, num_scales=3, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4),
                           com_kind="softmax", noise_mm=3.0, patch_groups=1)
  params = helpers.init(model, jax.random.key(0), volumes, affines)["params"]
  key = jax.random.key(11)
  out = inference.make_uncertainty(model, num_samples=7, chunk_size=chunk_size)(params, volumes, affines, key)
  single = jax.jit(lambda k: model.apply({"params": params}, volumes, affines, noise_key=k)["pred_mm"][:, -1])
  loop = np.stack([single(k) for k in jax.random.split(key, 7)], axis=1)  # (B, N, K, 3)
  helpers.assert_f32_equal(out["samples_mm"], loop, scale=HALF_WIDTH)
  helpers.assert_f32_equal(out["pred_mm"][:, -1], loop.mean(axis=1), scale=HALF_WIDTH)
  helpers.assert_f32_equal(out["std_mm"], loop.std(axis=1), scale=HALF_WIDTH)  # their spread
  clean = inference.make_predict(model)(params, volumes, affines)
  helpers.assert_f32_equal(out["pred_mm"][:, :-1], clean[:, :-1], scale=HALF_WIDTH)
  helpers.assert_f32_equal(out["deterministic_mm"], clean[:, -1], scale=HALF_WIDTH)
  # and the model's own batched path agrees
  batched = jax.jit(lambda k: model.apply({"params": params}, volumes, affines, noise_key=k,
                                          num_samples=7))(key)
  helpers.assert_f32_equal(batched["samples_mm"], loop, scale=HALF_WIDTH)


def test_uncertainty_runs_the_models_own_finest_scale():
  """The noise passes run the finest scale as the model builds it: its own U-Net width (`finest_unet`), its
  landmark conditioning (`landmark_film`) and learnt offsets (`landmark_offset`), here all non-zero; a
  finest scale rebuilt from the shared settings alone would read the patches unconditioned (0.4 mm off
  here) or fail on the wider U-Net's parameters."""
  volumes, affines = helpers.random_pyramid(batch=1, seed=5, flip=(1, -1, 1))
  model = MultiScaleLocNet(2, num_scales=3, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4),
                           com_kind="softmax", noise_mm=3.0, patch_groups=1, landmark_film=True,
                           finest_unet={"base_channels": 6}, landmark_offset=True)
  params = helpers.init(model, jax.random.key(0), volumes, affines)["params"]
  params = jax.tree_util.tree_map_with_path(  # zero at init: give the conditioning and offsets values
      lambda k, v: v + 0.1 * jax.random.normal(jax.random.key(len(str(k))), v.shape)
      if "_film" in str(k) or "landmark_offset" in str(k) else v, params)
  key = jax.random.key(11)
  out = inference.make_uncertainty(model, num_samples=3, chunk_size=1)(params, volumes, affines, key)
  single = jax.jit(lambda k: model.apply({"params": params}, volumes, affines, noise_key=k)["pred_mm"][:, -1])
  loop = np.stack([single(k) for k in jax.random.split(key, 3)], axis=1)  # (B, N, K, 3)
  helpers.assert_f32_equal(out["samples_mm"], loop, scale=HALF_WIDTH)
  # the finest scale's offsets alone (the coarser ones move its crops): without them, the samples move by them
  params["landmark_offset"] = params["landmark_offset"].at[:-1].set(0.0)
  offset = 20.0 * np.asarray(params["landmark_offset"][-1])  # locnet.OFFSET_UNIT_MM mm per unit
  assert np.abs(offset).max() > 0.5
  shifted = inference.make_uncertainty(model, num_samples=3, chunk_size=1)(params, volumes, affines, key)
  plain = inference.make_uncertainty(model.clone(landmark_offset=False), num_samples=3, chunk_size=1)
  np.testing.assert_allclose(shifted["samples_mm"] - plain(params, volumes, affines, key)["samples_mm"],
                             np.broadcast_to(offset, loop.shape), atol=1e-3)


def test_auto_chunk_size_follows_the_backend():
  assert inference.auto_chunk_size(50) == (1 if jax.default_backend() == "cpu" else 10)
  assert inference.auto_chunk_size(3) in (1, 3)


def test_uncertainty_needs_two_scales():
  with pytest.raises(ValueError, match=">= 2 scales"):
    inference.make_uncertainty(MultiScaleLocNet(2, num_scales=1), num_samples=5, chunk_size=5)
