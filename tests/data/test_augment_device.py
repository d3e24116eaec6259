"""On-device augmentation: the host's warp computed on the device, image and landmarks moved together,
the host's distribution of draws, one draw per key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from locnet_jax import geometry
from locnet_jax.data import augment_device, augment_host
from tests import helpers

NO_INTENSITY = dict(max_gamma=0.0, max_intensity_scale=0.0, max_intensity_shift=0.0, noise_std=0.0)


def _oblique_affine():
  """Rotated, x-flipped, anisotropic voxel -> RAS mm."""
  return helpers.oblique_affine((25, -10, 40), (-1.2, 0.9, 2.0), (10.0, -20.0, 5.0), order="zyx")


def test_rotation_matches_scipys_extrinsic_xyz():
  angles = np.array([0.3, -0.7, 1.1])
  np.testing.assert_allclose(augment_device.rotation_xyz(jnp.asarray(angles)),
                             Rotation.from_euler("xyz", angles).as_matrix(), atol=1e-6)


def test_transform_volume_equals_the_hosts_on_an_oblique_grid():
  rng = np.random.default_rng(0)
  volume = rng.uniform(0, 1, (14, 11, 9)).astype(np.float32)
  affine = _oblique_affine()
  center = geometry.vox_to_mm((np.array(volume.shape) - 1) / 2, affine)
  transform = augment_host.random_transform(rng, augment_host.AugmentSettings(max_rotation_deg=30, max_scale=0.1,
                                                                     max_translation_mm=4), center)
  host = augment_host.transform_volume(volume, affine, transform)
  device = np.asarray(augment_device.transform_volume(jnp.asarray(volume), jnp.asarray(affine, jnp.float32),
                                                      jnp.asarray(transform, jnp.float32), max_points=4 * 11 * 9))
  assert np.mean(np.abs(host - volume)) > 0.1  # the warp really moved the image
  assert (host == 0).mean() > 0.05  # and brought in empty space, where both must put 0
  np.testing.assert_allclose(device, host, atol=2e-4)


def _blob_pyramid(center_mm):
  """A blob on a ~1.5 mm oblique, flipped grid centred on the world origin."""
  affine = _oblique_affine()
  affine[:3, :3] /= np.abs(affine[:3, :3]).sum(0).max() / 1.5
  affine[:3, 3] -= geometry.vox_to_mm(np.array([19.5] * 3), affine)
  return helpers.blob_pyramid(center_mm, affine_=affine)


def _batch(pyramids, targets):
  return {"volumes": [jnp.stack([p.volumes[s] for p in pyramids]) for s in range(len(pyramids[0].volumes))],
          "affines": [jnp.stack([jnp.asarray(p.affines[s], jnp.float32) for p in pyramids])
                      for s in range(len(pyramids[0].volumes))],
          "target_mm": jnp.asarray(np.stack(targets), jnp.float32)}


def test_image_and_landmarks_move_together_per_case():
  centers = [np.array([5.0, -3.0, 4.0]), np.array([-6.0, 2.0, -2.0])]
  pyramids = [_blob_pyramid(c) for c in centers]
  batch = _batch(pyramids, [np.array([c, [np.nan] * 3]) for c in centers])
  settings = augment_host.AugmentSettings(max_rotation_deg=15, max_scale=0.1, max_translation_mm=6, **NO_INTENSITY)
  out = jax.jit(lambda b, k: augment_device.augment_batch(b, k, settings=settings))(batch, jax.random.key(3))
  moved = np.asarray(out["target_mm"])
  assert np.all(np.isnan(moved[:, 1])) and np.all(np.isfinite(moved[:, 0]))
  shifts = moved[:, 0] - np.stack(centers)
  assert np.all(np.linalg.norm(shifts, axis=-1) > 1.0)
  assert np.linalg.norm(shifts[0] - shifts[1]) > 0.5  # each case drew its own transform
  for b, pyramid in enumerate(pyramids):
    for s, tol in zip(range(2), (0.8, 0.5)):  # the blob CoM estimate's own error (measured up to 0.33 at 2 mm)
      np.testing.assert_allclose(helpers.com_mm(np.asarray(out["volumes"][s][b]), pyramid.affines[s]), moved[b, 0],
                                 atol=tol)
    for s in range(2):
      np.testing.assert_array_equal(np.asarray(out["affines"][s][b]), np.asarray(batch["affines"][s][b]))


def test_draws_follow_the_settings_and_the_key():
  settings = augment_host.AugmentSettings(max_rotation_deg=10, max_scale=0.05, max_translation_mm=8)
  center = jnp.array([3.0, -4.0, 7.0])
  transforms = np.stack([augment_device.random_transform(jax.random.key(i), settings, center) for i in range(200)])
  linear = transforms[:, :3, :3]
  scales = np.cbrt(np.linalg.det(linear))
  assert scales.min() >= 0.95 - 1e-6 and scales.max() <= 1.05 + 1e-6 and scales.std() > 0.02
  angles = Rotation.from_matrix(linear / scales[:, None, None]).as_euler("xyz", degrees=True)
  assert np.abs(angles).max() <= 10 + 1e-3 and np.abs(angles).max() > 9
  moved_center = transforms[:, :3, :3] @ np.asarray(center) + transforms[:, :3, 3]
  assert np.abs(moved_center - center).max() <= 8 + 1e-4 and np.abs(moved_center - center).max() > 7
  np.testing.assert_array_equal(transforms[0], augment_device.random_transform(jax.random.key(0), settings, center))


def test_intensity_changes_and_elastic_refusal():
  pyramid = _blob_pyramid(np.zeros(3))
  batch = _batch([pyramid], [np.zeros((1, 3))])
  settings = augment_host.AugmentSettings(max_rotation_deg=0, max_scale=0, max_translation_mm=0, max_gamma=0,
                                     max_intensity_scale=0, max_intensity_shift=0.05, noise_std=0.01)
  out = augment_device.augment_batch(batch, jax.random.key(0), settings=settings)
  diff = np.asarray(out["volumes"][1][0]) - np.asarray(batch["volumes"][1][0])
  assert 0 < abs(np.mean(diff)) <= 0.05 + 1e-3  # one shift per case
  assert 0.005 < np.std(diff) < 0.02  # plus noise of std 0.01 (identity warp: no resampling error)
  with pytest.raises(ValueError, match="no elastic part"):
    augment_device.augment_batch(batch, jax.random.key(0), settings=augment_host.AugmentSettings(elastic_mm=2.0))
