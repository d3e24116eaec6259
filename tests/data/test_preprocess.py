"""Intensity normalisation and the multi-scale pyramid, checked on linear images and flipped storage."""

import numpy as np
import pytest

from locnet_jax import geometry
from locnet_jax.data import preprocess
from tests import helpers


def _linear_image(shape, affine, coefficients=(0.3, -0.7, 1.1), offset=5.0):
  """An image whose value is a linear function of the world position: trilinear sampling is exact."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
  return (geometry.vox_to_mm(grid, affine) @ np.asarray(coefficients) + offset).astype(np.float32)


def _oblique_affine():
  return helpers.oblique_affine((20, 10, -15), (1.2, -0.9, 1.5), (-30.0, 25.0, -20.0), order="zyx")


def test_every_level_samples_the_image_at_its_own_world_positions():
  affine = _oblique_affine()
  data = _linear_image((48, 56, 40), affine)
  center = preprocess.image_center_mm(data.shape, affine)
  pyramid = preprocess.build_pyramid(data, affine, spacings_mm=(4.0, 2.0, 1.0), finest_size=24)
  assert [v.shape for v in pyramid.volumes] == [(6, 6, 6), (12, 12, 12), (24, 24, 24)]
  for volume, level_affine, spacing in zip(pyramid.volumes, pyramid.affines, (4.0, 2.0, 1.0)):
    np.testing.assert_allclose(geometry.voxel_spacing_mm(level_affine), [spacing] * 3)
    np.testing.assert_allclose(preprocess.image_center_mm(volume.shape, level_affine), center, atol=1e-9)
    # away from the borders (edge padding of the filter), each voxel holds the image at its world position
    inner = tuple(slice(1, n - 1) for n in volume.shape)
    expected = _linear_image(volume.shape, level_affine)
    np.testing.assert_allclose(volume[inner], expected[inner], atol=2e-4)


def test_ras_and_lps_storage_of_one_image_give_identical_pyramids():
  rng = np.random.default_rng(0)
  data_ras = rng.normal(size=(30, 34, 26)).astype(np.float32)
  affine_ras = np.diag([1.0, 1.25, 0.8, 1.0])
  affine_ras[:3, 3] = [-15.0, -20.0, -10.0]
  # LPS storage: the first two axes flipped, the affine flipped with them (same world image)
  data_lps = data_ras[::-1, ::-1].copy()
  flip = np.diag([-1.0, -1.0, 1.0, 1.0])
  flip[:2, 3] = [data_ras.shape[0] - 1, data_ras.shape[1] - 1]
  affine_lps = affine_ras @ flip
  assert np.allclose(np.diag(affine_lps)[:3], [-1.0, -1.25, 0.8])
  ras = preprocess.build_pyramid(data_ras, affine_ras, spacings_mm=(2.0, 1.0), finest_size=32)
  lps = preprocess.build_pyramid(data_lps, affine_lps, spacings_mm=(2.0, 1.0), finest_size=32)
  for a, b in zip(ras.volumes, lps.volumes):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for a, b in zip(ras.affines, lps.affines):
    np.testing.assert_allclose(a, b, atol=1e-9)


def test_outside_the_image_is_zero_and_downsampling_keeps_the_mean():
  data = np.ones((8, 8, 8), np.float32)
  pyramid = preprocess.build_pyramid(data, np.eye(4), spacings_mm=(2.0, 1.0), finest_size=16)
  fine = pyramid.volumes[1]
  assert fine[0, 0, 0] == 0.0 and fine[8, 8, 8] == pytest.approx(1.0)
  assert preprocess.downsample2(fine).mean() == pytest.approx(fine.mean(), rel=1e-6)


def test_downsampling_from_a_finer_source_is_anti_aliased():
  # a checkerboard at the source's Nyquist frequency must not alias into the 4x coarser grid
  idx = np.indices((64, 64, 64)).sum(axis=0)
  data = (idx % 2).astype(np.float32)
  fine = preprocess.resample(data, np.diag([0.25, 0.25, 0.25, 1.0]), target_affine=np.diag([1.0, 1.0, 1.0, 1.0]),
                             target_shape=(12, 12, 12))
  assert np.abs(fine[2:-2, 2:-2, 2:-2] - 0.5).max() < 0.05


@pytest.mark.parametrize("mode, data, expected", [
    ("ct", np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0]), [0.0, 0.0, 0.5, 1.0, 1.0]),
    ("none", np.array([-5.0, 7.0]), [-5.0, 7.0]),
])
def test_intensity_normalisation(mode, data, expected):
  np.testing.assert_allclose(preprocess.normalize_intensity(data, mode=mode), expected)


def test_mr_percentile_scaling():
  data = np.arange(1001, dtype=np.float32)
  out = preprocess.normalize_intensity(data, mode="mr", mr_percentiles=(10, 90))
  assert out[100] == pytest.approx(0.0) and out[900] == pytest.approx(1.0) and out[500] == pytest.approx(0.5)
  assert out.min() == 0.0 and out.max() == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: preprocess.check_spacings((4.0, 1.0)), "each twice the next"),
    (lambda: preprocess.check_spacings((1.0, 2.0)), "each twice the next"),
    (lambda: preprocess.check_spacings(()), "each twice the next"),
    (lambda: preprocess.build_pyramid(np.ones((4, 4, 4)), np.eye(4), spacings_mm=(2.0, 1.0), finest_size=7),
     "divisible by"),
    (lambda: preprocess.normalize_intensity(np.ones(3), mode="pet"), "intensity mode"),
    (lambda: preprocess.normalize_intensity(np.ones(3), mode="mr"), "empty intensity range"),
    (lambda: preprocess.downsample2(np.ones((3, 4, 4))), "even sizes"),
])
def test_bad_arguments(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_the_affine_path_of_resample_equals_the_general_one_on_an_oblique_flipped_grid():
  rng = np.random.default_rng(4)
  data = rng.normal(size=(23, 17, 29)).astype(np.float32)
  source = helpers.oblique_affine(angles_deg=(20, -35, 10), spacing=(-1.1, 0.8, 2.3), origin=(5.0, -7.0, 3.0))
  target = helpers.oblique_affine(angles_deg=(-5, 12, 70), spacing=(1.3, -1.3, 1.3), origin=(0.0, 0.0, 0.0))
  center_mm = geometry.vox_to_mm((np.array(data.shape) - 1) / 2, source) + 8.0  # off-centre: a partial overlap
  target[:3, 3] = center_mm - target[:3, :3] @ ((np.array([14, 16, 12]) - 1) / 2)
  fast = preprocess.resample(data, source, target_affine=target, target_shape=(14, 16, 12), fill=-1.0)
  general = preprocess.resample(data, source, target_affine=target, target_shape=(14, 16, 12), fill=-1.0,
                                world_map=lambda p: p)
  assert np.sum(fast == -1.0) > 10 and np.sum(fast != -1.0) > 100  # the grids overlap, partly
  np.testing.assert_allclose(fast, general, atol=helpers.f32_atol(np.abs(data).max()))


def test_a_marked_outside_fills_the_grid_beyond_the_image_and_splits_back():
  """outside_value < 0: the grid beyond the image holds the marker, the image's voxels what the 0-filled
  pyramid holds; `split_outside` gives back that pyramid's image and a mask true where the image is."""
  affine = _oblique_affine()
  data = np.clip(_linear_image((30, 36, 26), affine, coefficients=(0.01, -0.01, 0.02), offset=0.5), 0, 1)
  kwargs = dict(spacings_mm=(4.0, 2.0), finest_size=48)  # 96 mm: wider than the ~40 mm image
  plain = preprocess.build_pyramid(data, affine, **kwargs)
  marked = preprocess.build_pyramid(data, affine, outside_value=-1.0, **kwargs)
  for level, (volume, zeroed, level_affine) in enumerate(zip(marked.volumes, plain.volumes, marked.affines)):
    depth = geometry.depth_in_grid_mm(helpers.voxel_grid_mm(level_affine, volume.shape), affine, data.shape)
    spacing = 2.0 * 2 ** (1 - level)
    far_out, deep_in = depth < -2 * spacing, depth > 2 * spacing
    assert far_out.mean() > 0.3 and deep_in.sum() > 20
    assert np.all(volume[far_out] == -1.0)
    np.testing.assert_allclose(volume[deep_in], zeroed[deep_in], atol=1e-6)
    image, inside = preprocess.split_outside(volume, outside_value=-1.0)
    assert np.all(inside[deep_in] == 1) and np.all(inside[far_out] == 0) and image.min() >= 0
    np.testing.assert_allclose(image[deep_in], zeroed[deep_in], atol=1e-6)
    assert np.all(image[inside == 0] == 0)
  same, none = preprocess.split_outside(plain.volumes[0], outside_value=0.0)
  assert none is None and np.array_equal(same, plain.volumes[0])
