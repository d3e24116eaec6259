"""Host augmentation moves image and landmarks together, exactly through the elastic warp, the same per seed;
its finest region is the whole-grid draw where the crops read."""

import numpy as np
import pytest
import scipy.ndimage

from locnet_jax import geometry
from locnet_jax.data import augment_host, preprocess
from tests import helpers
from tests.data import test_loader


@pytest.mark.parametrize("elastic_mm", [0.0, 3.0])
def test_augmentation_moves_image_and_landmarks_together(elastic_mm):
  center = np.array([5.0, -3.0, 4.0])
  pyramid = test_loader._blob_pyramid(center)
  settings = augment_host.AugmentSettings(max_rotation_deg=15, max_scale=0.1, max_translation_mm=6, noise_std=0.0,
                                     max_gamma=0.0, max_intensity_scale=0.0, max_intensity_shift=0.0,
                                     elastic_mm=elastic_mm)
  target = np.array([center, [np.nan] * 3])
  moved_pyramid, moved_target, transform = augment_host.augment(pyramid, target, np.random.default_rng(1), settings)
  assert np.linalg.norm(moved_target[0] - center) > 1.0 and np.all(np.isnan(moved_target[1]))
  # a non-affine warp also deforms the blob, which moves its centre of mass a little (most at 4 mm voxels)
  tolerances = (1.0, 1.0, 1.0) if elastic_mm else (0.6, 0.15, 0.1)
  for volume, affine, tol in zip(moved_pyramid.volumes, moved_pyramid.affines, tolerances):
    np.testing.assert_allclose(helpers.com_mm(volume, affine), moved_target[0], atol=tol)
  affine_only = geometry.apply_affine(transform, center)
  if elastic_mm:  # the elastic part moved the landmark beyond the affine transform, and the image with it
    assert np.linalg.norm(moved_target[0] - affine_only) > 0.3
  else:
    np.testing.assert_allclose(moved_target[0], affine_only)


def test_moved_points_map_back_exactly_through_the_elastic_warp():
  rng = np.random.default_rng(4)
  field = augment_host.ElasticField(rng, lower_mm=[-50, -50, -50], upper_mm=[50, 50, 50], max_mm=3.0)
  transform = augment_host.random_transform(rng, augment_host.AugmentSettings(), center_mm=np.zeros(3))
  points = rng.uniform(-30, 30, (6, 3))
  points[2] = np.nan
  moved = augment_host.move_points(points, transform=transform, elastic=field)
  assert np.all(np.isnan(moved[2]))
  ok = np.arange(6) != 2
  np.testing.assert_allclose(augment_host.source_points(transform, field)(moved[ok]), points[ok], atol=1e-6)
  assert np.abs(field(moved[ok])).max() > 0.5  # the field really moved them


def test_augmentation_is_deterministic_per_seed():
  pyramid = test_loader._blob_pyramid(np.zeros(3))
  settings = augment_host.AugmentSettings()
  a = augment_host.augment(pyramid, np.zeros((1, 3)), np.random.default_rng((0, 1, 2)), settings)
  b = augment_host.augment(pyramid, np.zeros((1, 3)), np.random.default_rng((0, 1, 2)), settings)
  c = augment_host.augment(pyramid, np.zeros((1, 3)), np.random.default_rng((0, 1, 3)), settings)
  np.testing.assert_array_equal(a[0].volumes[-1], b[0].volumes[-1])
  assert not np.allclose(a[1], c[1])


def test_the_finest_region_is_the_whole_grid_augmentation_around_the_landmarks():
  """`finest_margin_mm` computes the finest level only around the moved landmarks: there it equals the
  whole-grid draw (away from the box's faces, where blur and thick slices see the box's edge), outside it is
  `outside_value`, and the coarser levels, landmarks, presence and transform are the same draw."""
  affine = helpers.oblique_affine((20, -15, 30), (1.4, -1.6, 1.5), (0.0, 0.0, 0.0), order="xyz")
  affine[:3, 3] -= geometry.vox_to_mm(np.array([31.5] * 3), affine)
  rng = np.random.default_rng(5)
  data = scipy.ndimage.gaussian_filter(rng.standard_normal((64, 64, 64)), 2.5)
  data = ((data - data.min()) / (data.max() - data.min())).astype(np.float32)
  pyramid = preprocess.Pyramid((data[::2, ::2, ::2], data), (affine @ np.diag([2.0, 2.0, 2.0, 1.0]), affine))
  points = np.array([[-8.0, 4.0, 2.0], [6.0, -5.0, 9.0], [np.nan] * 3])
  common = dict(max_translation_mm=5.0, deform_mm=3.0, max_axis_scale=0.05, lut_probability=1.0, max_bias_log=0.3,
                max_blur_mm=1.5, thick_probability=0.5, max_thickness_mm=4.0, fov_probability=0.5, fov_min_mm=30.0,
                noise_std=0.0, outside_value=-1.0)
  cut = 0
  for seed in range(4):
    whole, part = (augment_host.augment_case(pyramid, points, np.random.default_rng(seed),
                                             augment_host.AugmentSettings(**common, finest_margin_mm=m))
                   for m in (0.0, 15.0))
    np.testing.assert_array_equal(part.transform, whole.transform)
    np.testing.assert_array_equal(part.target_mm, whole.target_mm)
    np.testing.assert_array_equal(part.present, whole.present)
    np.testing.assert_array_equal(part.pyramid.volumes[0], whole.pyramid.volumes[0])
    region = augment_host.finest_region(affine, data.shape, whole.target_mm, margin_mm=15.0)
    inside = np.zeros(data.shape, bool)
    inside[region] = True
    assert 0.05 < inside.mean() < 0.6  # a real cut: the work saved
    # every voxel within the margin of a landmark is in the region
    grid = helpers.voxel_grid_mm(affine, data.shape)
    near = np.any([np.linalg.norm(grid - p, axis=-1) < 15.0 for p in whole.target_mm[:2]], axis=0)
    assert np.all(inside[near])
    fine_part, fine_whole = part.pyramid.volumes[1], whole.pyramid.volumes[1]
    assert np.all(fine_part[~inside] == -1.0)
    inner = np.zeros(data.shape, bool)
    inner[tuple(slice(r.start + 4, r.stop - 4) for r in region)] = True
    assert inner.sum() > 1000
    np.testing.assert_allclose(fine_part[inner], fine_whole[inner], atol=1e-5)
    cut += int(np.any(fine_whole[inner] == -1.0))
  assert cut  # a field of view cut inside the region in some draw: the mask moved with the region too
