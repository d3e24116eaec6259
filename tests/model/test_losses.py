"""Masked losses in mm and the paper's loss-weight schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locnet_jax import geometry
from locnet_jax.model import losses, ops


@pytest.mark.parametrize("epoch, expected", [
    (0, [1.0, 0.0, 0.0, 0.0]),
    (125, [0.75, 0.5, 0.5, 0.25]),
    (250, [0.5, 1.0, 1.0, 0.5]),
    (375, [0.25, 0.5, 0.5, 0.75]),
    (500, [0.0, 0.0, 0.0, 1.0]),
])
def test_paper_schedule_for_four_scales_over_500_epochs(epoch, expected):
  np.testing.assert_allclose(losses.loss_weights(epoch, num_epochs=500, num_scales=4), expected, atol=1e-6)


@pytest.mark.parametrize("num_scales, epoch, num_epochs, expected", [
    (1, 0, 10, [1.0]),
    (1, 7, 10, [1.0]),
    (2, 3, 10, [0.7, 0.3]),
    (3, 2, 5, [0.6, 0.8, 0.4]),   # odd num_epochs: the middle peak at 2.5 is still exact
    (3, 3, 5, [0.4, 0.8, 0.6]),
    (3, 12, 10, [0.0, 0.0, 1.0]),  # past the end: held at the final weights
])
def test_schedule_other_sizes(num_scales, epoch, num_epochs, expected):
  np.testing.assert_allclose(losses.loss_weights(epoch, num_epochs=num_epochs, num_scales=num_scales),
                             expected, atol=1e-6)


def test_schedule_is_constant_within_an_epoch_and_jits():
  weights = jax.jit(lambda e: losses.loss_weights(e, num_epochs=500, num_scales=4))
  np.testing.assert_allclose(weights(125.0), weights(125.99), atol=0)
  np.testing.assert_allclose(weights(jnp.int32(250)), [0.5, 1.0, 1.0, 0.5], atol=1e-6)
  assert not np.allclose(weights(125.0), weights(126.0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_epochs=0, num_scales=4), "num_epochs"),
    (dict(num_epochs=10.5, num_scales=4), "num_epochs"),
    (dict(num_epochs=10, num_scales=0), "num_scales"),
])
def test_schedule_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    losses.loss_weights(0, **kwargs)


def test_per_scale_loss_is_mean_squared_euclidean_error_over_present_landmarks():
  pred = jnp.array([[[[1.0, 0, 0], [0, 0, 0]], [[0, 2.0, 0], [0, 0, 3.0]]],
                    [[[0, 0, 0], [1.0, 1.0, 1.0]], [[0, 0, 0], [2.0, 2.0, 2.0]]]])  # (B=2, S=2, K=2, 3)
  target = jnp.array([[[0.0, 0, 0], [np.nan] * 3], [[0.0, 0, 0], [0.0, 0, 0]]])
  per_scale = losses.per_scale_loss(pred, target)
  # present pairs: (0, 0), (1, 0), (1, 1); scale 0: 1 + 0 + 3; scale 1: 4 + 0 + 12
  np.testing.assert_allclose(per_scale, [4 / 3, 16 / 3], rtol=1e-6)
  np.testing.assert_allclose(losses.weighted_loss(per_scale, jnp.array([0.25, 1.0])), 1 / 3 + 16 / 3, rtol=1e-6)


def test_missing_landmark_contributes_nothing_not_even_nan_gradients():
  pred = jnp.array([[[[1.0, 2, 3], [4, 5, 6]]]])
  target = jnp.array([[[0.0, 0, 0], [np.nan, np.nan, np.nan]]])
  loss, grad = jax.value_and_grad(lambda p: losses.per_scale_loss(p, target).sum())(pred)
  assert float(loss) == pytest.approx(14.0)
  np.testing.assert_array_equal(grad[0, 0, 1], [0, 0, 0])
  np.testing.assert_allclose(grad[0, 0, 0], [2, 4, 6])
  # a landmark with any NaN coordinate counts as missing; none present gives 0, not NaN
  assert float(losses.per_scale_loss(pred, jnp.full((1, 2, 3), np.nan)).sum()) == 0.0
  np.testing.assert_array_equal(losses.landmark_mask(jnp.array([[1.0, np.nan, 2.0], [1, 2, 3]])), [False, True])


def test_per_scale_loss_shape_errors():
  with pytest.raises(ValueError, match="pred_mm must be"):
    losses.per_scale_loss(jnp.zeros((2, 3, 3)), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="pred_mm must be"):
    losses.per_scale_loss(jnp.zeros((2, 1, 4, 3)), jnp.zeros((2, 3, 3)))


def test_heatmap_targets_peak_at_the_landmark_with_std_in_mm():
  affine = np.array([[0.0, -2.0, 0.0, 40.0], [1.0, 0.0, 0.0, -10.0], [0.0, 0.0, 3.0, 5.0], [0, 0, 0, 1]])
  peak_vox = np.array([7.0, 9.0, 4.0])
  target_mm = jnp.asarray(np.stack([geometry.vox_to_mm(peak_vox, affine), [np.nan] * 3]), jnp.float32)
  heatmaps = losses.heatmap_targets(target_mm, affine, shape=(16, 20, 10), sigma_mm=6.0)
  assert heatmaps.shape == (16, 20, 10, 2)
  np.testing.assert_array_equal(ops.heatmap_argmax(heatmaps[..., 0]), peak_vox)
  assert float(heatmaps[7, 9, 4, 0]) == pytest.approx(1.0, abs=1e-5)
  # one voxel along axis 0 is 1 mm, along axis 1 is 2 mm: exp(-d^2 / (2 * 6^2))
  assert float(heatmaps[8, 9, 4, 0]) == pytest.approx(np.exp(-1 / 72), rel=1e-4)
  assert float(heatmaps[7, 10, 4, 0]) == pytest.approx(np.exp(-4 / 72), rel=1e-4)
  assert float(jnp.abs(heatmaps[..., 1]).max()) == 0.0  # missing landmark: empty target


def test_heatmap_l2_loss_ignores_missing_channels():
  heatmap = jnp.ones((2, 3, 3, 3, 2))
  target = jnp.zeros((2, 3, 3, 3, 2)).at[0, ..., 1].set(1.0)
  mask = jnp.array([[True, True], [True, False]])
  # present channels: (0, 0) error 1, (0, 1) error 0, (1, 0) error 1
  assert float(losses.heatmap_l2_loss(heatmap, target, mask)) == pytest.approx(2 / 3)
