"""Closed-form and reference checks of the parameter-free ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from locnet_jax.model import ops

KINDS = ops.CENTER_OF_MASS_KINDS


def _log_gaussian(shape, center, sigma):
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
  return -np.sum((grid - np.asarray(center)) ** 2, axis=-1) / (2 * sigma ** 2)


# ---------------------------------------------------------------- centre of mass

@pytest.mark.parametrize("kind", KINDS)
def test_center_of_mass_of_one_hot_is_its_voxel(kind):
  heatmap = np.zeros((9, 12, 7), np.float32)
  heatmap[6, 2, 5] = 1.0 if kind == "relu" else 0.0
  if kind == "softmax":  # a one-hot in probability space: one logit far above the rest
    heatmap -= 60.0
    heatmap[6, 2, 5] = 0.0
  np.testing.assert_allclose(ops.center_of_mass(jnp.asarray(heatmap), kind=kind), [6, 2, 5], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_center_of_mass_of_gaussian_at_non_integer_point(kind):
  center = (10.3, 7.65, 13.2)
  log_g = _log_gaussian((21, 17, 26), center, sigma=1.7)
  heatmap = np.exp(log_g) if kind == "relu" else log_g  # softmax(log g) = g normalised
  com = ops.center_of_mass(jnp.asarray(heatmap, jnp.float32), kind=kind)
  assert com.dtype == jnp.float32 and com.shape == (3,)
  np.testing.assert_allclose(com, center, atol=1e-4)


def test_center_of_mass_matches_weighted_mean_of_random_heatmap():
  rng = np.random.default_rng(0)
  heatmap = rng.normal(size=(5, 6, 7)).astype(np.float32)
  w = np.maximum(heatmap, 0)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in heatmap.shape], indexing="ij"), axis=-1)
  expected = (grid * w[..., None]).sum((0, 1, 2)) / w.sum()
  np.testing.assert_allclose(ops.center_of_mass(jnp.asarray(heatmap)), expected, rtol=1e-5)


def test_dead_relu_heatmap_falls_back_to_softmax_with_finite_gradient():
  heatmap = -np.ones((6, 8, 10), np.float32)  # every ReLU weight is zero
  heatmap[5, 7, 9] = -0.5
  com = ops.center_of_mass(jnp.asarray(heatmap))
  np.testing.assert_allclose(com, ops.center_of_mass(jnp.asarray(heatmap), kind="softmax"), atol=1e-6)
  assert np.all(np.isfinite(com))
  grad = jax.grad(lambda h: ops.center_of_mass(h).sum())(jnp.asarray(heatmap))
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  constant = ops.center_of_mass(jnp.full((6, 8, 10), -3.0))
  np.testing.assert_allclose(constant, [2.5, 3.5, 4.5], atol=1e-5)  # the grid centre


def test_center_of_mass_is_shift_equivariant_and_vmaps():
  rng = np.random.default_rng(1)
  heatmaps = np.zeros((4, 16, 16, 16), np.float32)
  heatmaps[:, 4:8, 4:8, 4:8] = rng.random((4, 4, 4, 4))
  shifted = np.roll(heatmaps, (3, -2, 5), axis=(1, 2, 3))
  com = jax.jit(jax.vmap(ops.center_of_mass))
  np.testing.assert_allclose(com(shifted) - com(heatmaps), np.tile([3, -2, 5], (4, 1)), atol=1e-4)


# ---------------------------------------------------------------- crop

def _volume(shape=(20, 17, 23), seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("step", [1.0, 0.5, (0.75, 1.25, 2.0)])
def test_crop_patch_matches_scipy_map_coordinates_at_interior_points(step):
  volume = _volume()
  center = np.array([9.37, 8.21, 11.6], np.float32)
  shape = (6, 5, 7)
  patch = ops.crop_patch(jnp.asarray(volume), jnp.asarray(center), shape=shape, step=step)
  step = np.broadcast_to(np.asarray(step, np.float64), (3,))
  axes = [center[a] + (np.arange(n) - (n - 1) / 2) * step[a] for a, n in enumerate(shape)]
  coords = np.stack(np.meshgrid(*axes, indexing="ij"))
  assert coords.min() > 0 and np.all(coords.max(axis=(1, 2, 3)) < np.array(volume.shape) - 1)
  expected = scipy.ndimage.map_coordinates(volume, coords, order=1)
  assert patch.shape == shape
  np.testing.assert_allclose(patch, expected, atol=1e-5)


def test_crop_patch_is_centred_exactly_at_center_vox():
  volume = _volume()
  center = jnp.array([7.0, 9.0, 4.0])
  patch = ops.crop_patch(jnp.asarray(volume), center, shape=5)  # odd: the middle voxel is the centre
  assert patch[2, 2, 2] == pytest.approx(volume[7, 9, 4], abs=1e-6)
  even = ops.crop_patch(jnp.asarray(volume), center, shape=4)  # even: centre between patch voxels 1, 2
  for j, offset in ((1, -0.5), (2, 0.5)):
    np.testing.assert_allclose(even[j, j, j], scipy.ndimage.map_coordinates(
        volume, (np.asarray(center) + offset)[:, None], order=1)[0], atol=1e-5)


def test_crop_patch_outside_takes_nearest_edge_value():
  volume = _volume((8, 9, 10))
  patch = ops.crop_patch(jnp.asarray(volume), jnp.array([-20.0, 4.0, 30.0]), shape=3)
  np.testing.assert_allclose(patch[:, 1, :], np.full((3, 3), volume[0, 4, 9]), atol=1e-6)
  coords = np.stack(np.meshgrid(np.arange(-21, -18), np.arange(3, 6), np.arange(29, 32), indexing="ij"))
  np.testing.assert_allclose(patch, scipy.ndimage.map_coordinates(volume, coords, order=1, mode="nearest"),
                             atol=1e-6)


def test_crop_patch_casts_integer_volumes_to_float():
  volume = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
  patch = ops.crop_patch(jnp.asarray(volume), jnp.array([2.5, 2.25, 3.0]), shape=1)
  assert jnp.issubdtype(patch.dtype, jnp.floating)
  assert float(patch[0, 0, 0]) == pytest.approx(2.5 * 42 + 2.25 * 7 + 3.0, abs=1e-4)


def test_crop_patch_gradient_wrt_center_matches_central_differences():
  volume = jnp.asarray(_volume())
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5, 6)), jnp.float32)
  center = jnp.array([9.37, 8.21, 11.62])  # samples stay > 0.1 voxel from the kinks at integers

  def f(c):
    return jnp.sum(weights * ops.crop_patch(volume, c, shape=(4, 5, 6)))

  grad = jax.grad(f)(center)
  eps = 0.05
  numeric = [(f(center.at[a].add(eps)) - f(center.at[a].add(-eps))) / (2 * eps) for a in range(3)]
  np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3)
  assert np.abs(grad).min() > 0.1


def test_crop_patch_gradient_wrt_volume_is_the_adjoint_of_the_sampling():
  volume = jnp.asarray(_volume((6, 7, 8)))
  center = jnp.array([2.3, 3.6, 4.1])
  weights = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, 3)), jnp.float32)
  grad = jax.grad(lambda v: jnp.sum(weights * ops.crop_patch(v, center, shape=3)))(volume)
  # the crop is linear in the volume: <weights, crop(v)> == <grad, v> for every v
  other = jnp.asarray(_volume((6, 7, 8), seed=9))
  np.testing.assert_allclose(jnp.sum(grad * other),
                             jnp.sum(weights * ops.crop_patch(other, center, shape=3)), rtol=1e-4)
  assert float(jnp.sum(grad)) == pytest.approx(float(jnp.sum(weights)), rel=1e-5)


def test_crop_patch_under_jit_and_vmap_equals_one_by_one():
  volume = jnp.asarray(_volume())
  centers = jnp.array([[5.5, 6.0, 7.25], [10.0, 2.0, 20.0], [1.0, 1.0, 1.0]])
  crop = jax.jit(jax.vmap(lambda c: ops.crop_patch(volume, c, shape=(4, 4, 4), step=0.5)))
  batched = crop(centers)
  for i in range(3):
    np.testing.assert_allclose(batched[i], ops.crop_patch(volume, centers[i], shape=4, step=0.5), atol=1e-6)


def test_patch_to_volume_vox_inverts_the_patch_grid():
  center = jnp.array([3.2, 4.7, 9.9])
  grid = ops.patch_grid_vox(center, shape=(4, 5, 6), step=(0.5, 1.0, 2.0))
  index = jnp.array([3.0, 0.0, 5.0])
  np.testing.assert_allclose(ops.patch_to_volume_vox(index, center, shape=(4, 5, 6), step=(0.5, 1.0, 2.0)),
                             grid[:, 3, 0, 5], atol=1e-6)


# ---------------------------------------------------------------- heatmaps and pooling

def test_gaussian_heatmap_and_argmax():
  heatmap = ops.gaussian_heatmap((10, 12, 14), jnp.array([3.0, 8.0, 5.0]), sigma_vox=(1.0, 2.0, 3.0))
  assert float(heatmap[3, 8, 5]) == pytest.approx(1.0)
  assert float(heatmap[4, 8, 5]) == pytest.approx(np.exp(-0.5), rel=1e-6)
  assert float(heatmap[3, 8, 8]) == pytest.approx(np.exp(-0.5), rel=1e-6)
  np.testing.assert_array_equal(ops.heatmap_argmax(heatmap), [3, 8, 5])


def test_blur_pool_is_the_binomial_filter_with_reflect_padding_then_stride_two():
  x = np.random.default_rng(4).normal(size=(1, 8, 6, 4, 2)).astype(np.float32)
  expected = x
  for axis in (1, 2, 3):
    expected = scipy.ndimage.correlate1d(expected, [0.25, 0.5, 0.25], axis=axis, mode="mirror")
  expected = expected[:, ::2, ::2, ::2]
  np.testing.assert_allclose(ops.blur_pool(jnp.asarray(x)), expected, atol=1e-6)
  assert ops.max_blur_pool(jnp.asarray(x)).shape == (1, 4, 3, 2, 2)


def test_max_blur_pool_is_dense_max_then_blur():
  x = np.random.default_rng(5).normal(size=(2, 4, 6, 8, 3)).astype(np.float32)
  padded = np.pad(x, [(0, 0), (0, 1), (0, 1), (0, 1), (0, 0)], mode="edge")
  dense = scipy.ndimage.maximum_filter(padded, size=(1, 2, 2, 2, 1), origin=(0, -1, -1, -1, 0))[:, :4, :6, :8]
  np.testing.assert_allclose(ops.max_blur_pool(jnp.asarray(x)), ops.blur_pool(jnp.asarray(dense)), atol=1e-6)


# ---------------------------------------------------------------- bad arguments

# ---------------------------------------------------------------- convolution as 2-D slices
def _lax_conv3d(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


@pytest.mark.parametrize("kernel_shape", [(3, 3, 3), (1, 1, 1), (2, 3, 4), (5, 1, 3)])
def test_conv3d_as_2d_equals_the_3d_convolution_and_its_gradients(kernel_shape):
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 7, 3))  # odd, unequal sizes: padding and axis order show
  kernel = jax.random.normal(jax.random.key(1), (*kernel_shape, 3, 4))
  np.testing.assert_allclose(ops.conv3d_as_2d(x, kernel), _lax_conv3d(x, kernel), atol=1e-4, rtol=1e-5)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  got = jax.grad(loss(ops.conv3d_as_2d), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(_lax_conv3d), argnums=(0, 1))(x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_conv_general_dilated_as_2d_falls_back_for_what_it_does_not_cover():
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 6, 2))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 2))
  dims = ("NDHWC", "DHWIO", "NDHWC")
  for kwargs in [dict(window_strides=(2, 2, 2), padding="SAME"), dict(window_strides=(1, 1, 1), padding="VALID"),
                 dict(window_strides=(1, 1, 1), padding="SAME", rhs_dilation=(2, 2, 2))]:
    np.testing.assert_allclose(ops.conv_general_dilated_as_2d(x, kernel, dimension_numbers=dims, **kwargs),
                               jax.lax.conv_general_dilated(x, kernel, dimension_numbers=dims, **kwargs),
                               atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: ops.center_of_mass(jnp.ones((4, 4))), "3 dimensions"),
    (lambda: ops.center_of_mass(jnp.ones((4, 4, 4, 1))), "3 dimensions"),
    (lambda: ops.center_of_mass(jnp.ones((4, 4, 4)), kind="argmax"), "kind must be one of"),
    (lambda: ops.crop_patch(jnp.ones((4, 4)), jnp.zeros(3), shape=2), "3 dimensions"),
    (lambda: ops.crop_patch(jnp.ones((4, 4, 4)), jnp.zeros(2), shape=2), r"center_vox must have shape \(3,\)"),
    (lambda: ops.crop_patch(jnp.ones((4, 4, 4)), jnp.zeros(3), shape=(2, 2)), "shape must be"),
    (lambda: ops.crop_patch(jnp.ones((4, 4, 4)), jnp.zeros(3), shape=0), "shape must be"),
    (lambda: ops.crop_patch(jnp.ones((4, 4, 4)), jnp.zeros(3), shape=2.5), "shape must be"),
    (lambda: ops.crop_patch(jnp.ones((4, 4, 4)), jnp.zeros(3), shape=2, step=0.0), "step must be positive"),
    (lambda: ops.crop_patch(jnp.ones((4, 4, 4)), jnp.zeros(3), shape=2, step=(1, 1)), "step must be"),
    (lambda: ops.crop_patch(jnp.ones((0, 4, 4)), jnp.zeros(3), shape=2), "must not be empty"),
])
def test_bad_arguments_raise_clear_value_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()
