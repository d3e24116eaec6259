"""Presence: read from where the model places a landmark against the image's field of view (trained with
cut-away positions kept), or learnt (from the heatmaps' mass, or by a classifier of the coarsest volume); it
says which landmarks an image holds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from locnet_jax.eval import qc
from locnet_jax.model import losses
from locnet_jax.model.locnet import MultiScaleLocNet
from locnet_jax.model.presence import PresenceEncoder
from locnet_jax.train import steps
from tests import helpers

SIZE = 16
SPACINGS = (4.0, 2.0)
TWO_BLOBS_MM = np.array([[-14.0, 0.0, 0.0], [14.0, 0.0, 0.0]])  # a bright and a dim blob, left and right


def _case(rng: np.random.Generator, *, crop_second: bool):
  """Two blobs in a 32 mm wide pyramid (shifted a little per case); with `crop_second`, the image is cut
  to the left half (the field of view), so the second landmark is not in it."""
  shift = rng.uniform(-3, 3, 3)
  centers = TWO_BLOBS_MM * 0.5 + shift
  volumes, affines = [], []
  for spacing in SPACINGS:
    n = int(round(SIZE * 4.0 / spacing / 2))
    aff = helpers.affine([spacing] * 3, [-(n - 1) * spacing / 2] * 3)
    volume = helpers.blob_volume(aff, (n,) * 3, centers, [1.0, 0.6], sigma_mm=3.0)
    if crop_second:
      volume[n // 2:] = 0.0  # x > 0 removed: the right blob is gone
    volume += rng.normal(0, 0.02, volume.shape).astype(np.float32)
    volumes.append(volume)
    affines.append(aff)
  target = centers.copy()
  present = np.array([1.0, 0.0 if crop_second else 1.0])
  target[present == 0] = np.nan
  return volumes, affines, target, present


def _batch(cases):
  return {"volumes": [jnp.stack([c[0][s] for c in cases]) for s in range(len(SPACINGS))],
          "affines": [jnp.stack([jnp.asarray(c[1][s], jnp.float32) for c in cases]) for s in range(len(SPACINGS))],
          "target_mm": jnp.asarray(np.stack([c[2] for c in cases]), jnp.float32),
          "present": jnp.asarray(np.stack([c[3] for c in cases]), jnp.float32)}


@pytest.mark.slow  # many programs to compile: over 25 s on 2 cores
def test_presence_learns_that_a_landmark_was_cropped_away():
  """Trained on images where the second blob is cut away half the time, the presence output must call it
  absent on new cropped images and present on new whole ones (and the first present in both)."""
  rng = np.random.default_rng(0)
  model = MultiScaleLocNet(2, num_scales=2, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4),
                           presence=True, patch_groups=1)
  train = [_case(rng, crop_second=i % 2 == 1) for i in range(8)]
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=_batch(train[:1])["volumes"],
                                   affines=_batch(train[:1])["affines"], learning_rate=3e-3)
  step = jax.jit(functools.partial(steps.train_step, key=None, weights=jnp.array([1.0, 1.0]), presence_weight=10.0))
  batch = _batch(train)
  for _ in range(300):
    state, metrics = step(state, batch)
  assert float(metrics["presence_bce"]) < 0.2
  test = [_case(rng, crop_second=crop) for crop in (False, True, False, True)]
  out = model.apply({"params": state.params}, *[_batch(test)[k] for k in ("volumes", "affines")])
  probability = np.asarray(jax.nn.sigmoid(out["presence_logit"]))
  assert np.all(probability[:, 0] > 0.8), probability
  assert np.all(probability[[0, 2], 1] > 0.9), probability
  assert np.all(probability[[1, 3], 1] < 0.2), probability


def test_the_image_reader_learns_which_landmark_a_crop_cut_away():
  """`PresenceEncoder` alone, trained on the coarsest volumes of whole and cropped images (the second blob cut
  away half the time), calls the second blob absent on new cropped images only, and the first present always."""
  rng = np.random.default_rng(2)
  reader = PresenceEncoder(2, channels=(4, 8, 8), hidden=16)
  train = [_case(rng, crop_second=i % 2 == 1) for i in range(8)]
  volumes = jnp.stack([c[0][0] for c in train])  # (8, 8, 8, 8): the 4 mm level
  present = jnp.asarray(np.stack([c[3] for c in train]), jnp.float32)
  params = helpers.init(reader, jax.random.key(0), volumes)["params"]
  optimizer = optax.adam(3e-3)
  loss = lambda p: losses.presence_loss(reader.apply({"params": p}, volumes), present)  # noqa: E731

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for _ in range(100):
    params, opt_state = step(params, opt_state)
  crops = (False, True, False, True, True, False)
  test = [_case(rng, crop_second=crop) for crop in crops]
  probability = np.asarray(jax.nn.sigmoid(reader.apply({"params": params}, jnp.stack([c[0][0] for c in test]))))
  assert np.all(probability[:, 0] > 0.8), probability
  np.testing.assert_array_equal(probability[:, 1] < 0.5, crops)
  with pytest.raises(ValueError, match=r"sizes divisible by 8, got \(8, 12, 12, 12\)"):
    reader.init(jax.random.key(0), jnp.zeros((8, 12, 12, 12)))


def test_presence_loss_is_the_cross_entropy_of_known_entries_only():
  logit = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
  present = jnp.array([[1.0, 0.0, jnp.nan], [jnp.nan, 1.0, 0.0]])
  known = [(0, 0, 1), (0, 1, 0), (1, 1, 1), (1, 2, 0)]
  by_hand = np.mean([np.log1p(np.exp(-float(logit[b, k]))) if y else np.log1p(np.exp(float(logit[b, k])))
                     for b, k, y in known])
  np.testing.assert_allclose(float(losses.presence_loss(logit, present)), by_hand, rtol=1e-6)
  assert float(losses.presence_loss(logit, jnp.full_like(present, jnp.nan))) == 0.0  # nothing known


@pytest.mark.slow  # many programs to compile: over 25 s on 2 cores
def test_presence_is_opt_in_and_leaves_the_coordinates_alone():
  """Without `presence` the model has no presence parameters (older checkpoints still load); with it, the
  coordinates are the same function of the same scale parameters, and a gradient of the presence loss
  reaches every scale's U-Net."""
  volumes, affines = helpers.random_pyramid(batch=2, sizes=(8, 16), spacings=(4.0, 2.0))
  plain = MultiScaleLocNet(2, num_scales=2, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4),
                           patch_groups=1)
  with_presence = plain.clone(presence=True)
  params = helpers.init(with_presence, jax.random.key(0), volumes, affines)["params"]
  assert set(params) == {"scale0", "scale1", "presence"}
  plain_params = helpers.init(plain, jax.random.key(0), volumes, affines)["params"]
  assert set(plain_params) == {"scale0", "scale1"}
  out = with_presence.apply({"params": params}, volumes, affines)
  scales_only = {k: v for k, v in params.items() if k != "presence"}
  np.testing.assert_array_equal(out["pred_mm"], plain.apply({"params": scales_only}, volumes, affines)["pred_mm"])
  assert out["presence_logit"].shape == (2, 2)
  present = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  grads = jax.grad(lambda p: losses.presence_loss(
      with_presence.apply({"params": p}, volumes, affines)["presence_logit"], present))(params)
  for scale in ("scale0", "scale1"):
    assert float(optax.tree.norm(grads[scale])) > 0, scale
  # read from the image instead: its own parameters, and its loss moves no coordinate
  from_image = plain.clone(presence=True, presence_from="image")
  params = helpers.init(from_image, jax.random.key(0), volumes, affines)["params"]
  assert set(params["presence"]) >= {"conv0", "hidden", "logit"}
  np.testing.assert_array_equal(from_image.apply({"params": params}, volumes, affines)["pred_mm"],
                                plain.apply({"params": {k: params[k] for k in ("scale0", "scale1")}}, volumes,
                                            affines)["pred_mm"])
  grads = jax.grad(lambda p: losses.presence_loss(
      from_image.apply({"params": p}, volumes, affines)["presence_logit"], present))(params)
  assert float(optax.tree.norm(grads["presence"])) > 0
  for scale in ("scale0", "scale1"):
    assert float(optax.tree.norm(grads[scale])) == 0, scale


@pytest.mark.slow  # trains a tiny model: over 25 s on 2 cores
def test_trained_with_cut_away_positions_the_model_calls_a_cropped_landmark_absent():
  """The recipe of the real-scan variation (no learnt head): trained with the position of a cut-away
  landmark kept as its target, the coarse scale places it beyond the image's edge, so reading it against
  the cropped image's own grid (`qc.presence`) calls it absent, and nothing is absent in whole images."""
  rng = np.random.default_rng(1)
  model = MultiScaleLocNet(2, num_scales=2, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4),
                           patch_groups=1)
  train = [_case(rng, crop_second=i % 2 == 1) for i in range(8)]
  batch = _batch(train)
  batch["target_mm"] = jnp.asarray(np.stack([TWO_BLOBS_MM * 0.5 + np.nanmean(c[2] - TWO_BLOBS_MM * 0.5, 0)
                                             for c in train]), jnp.float32)  # the cut-away blob's position too
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                   affines=batch["affines"], learning_rate=3e-3)
  step = jax.jit(functools.partial(steps.train_step, key=None, weights=jnp.array([1.0, 1.0])))
  for _ in range(150):
    state, _ = step(state, batch)
  test = [_case(rng, crop_second=crop) for crop in (False, True, False, True)]
  tb = _batch(test)
  pred_mm = np.asarray(model.apply({"params": state.params}, tb["volumes"], tb["affines"])["pred_mm"])
  n = test[0][0][0].shape[0]
  for c, crop in enumerate((False, True, False, True)):
    grid = (test[c][1][0], (n // 2 if crop else n, n, n))  # a cropped image covers only x < 0: its own grid
    presence = qc.presence(pred_mm[c], grid)
    assert presence[0] > 0.9, (c, presence)
    assert (presence[1] < 0.5) if crop else (presence[1] > 0.9), (c, presence)
