"""Host augmentation moves image and landmarks together, exactly through the elastic warp, the same per seed."""

import numpy as np
import pytest

from locnet_jax import geometry
from locnet_jax.data import augment_host
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
