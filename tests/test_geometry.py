"""Voxel <-> world conversions, both ways, on non-trivial affines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locnet_jax import geometry
from tests import helpers

AFFINES = {
    "ras_iso": np.diag([1.0, 1.0, 1.0, 1.0]),
    "lps_aniso": np.array([[-0.5, 0, 0, 80.0], [0, -0.8, 0, 100.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]]),
    "permuted_las": np.array([[0, 0, -1.2, 60.0], [0.9, 0, 0, -70.0], [0, 3.0, 0, 10.0], [0, 0, 0, 1]]),
    "oblique_flipped_anisotropic": helpers.oblique_affine((17, -32, 48), (0.7, -1.3, 2.9), (-91.5, 120.25, -33.0),
                                                         order="xyz"),  # anisotropic, y flipped
}


@pytest.mark.parametrize("name", AFFINES)
def test_vox_to_mm_to_vox_round_trip_numpy_and_jax(name):
  affine = AFFINES[name]
  points_vox = np.random.default_rng(0).uniform(-10, 200, size=(50, 3))
  points_mm = geometry.vox_to_mm(points_vox, affine)
  assert isinstance(points_mm, np.ndarray) and points_mm.dtype == np.float64
  np.testing.assert_allclose(geometry.mm_to_vox(points_mm, affine), points_vox, atol=1e-10)
  np.testing.assert_allclose(geometry.vox_to_mm(geometry.mm_to_vox(points_mm, affine), affine), points_mm,
                             atol=1e-10)
  jax_vox = jax.jit(geometry.mm_to_vox)(jnp.asarray(points_mm, jnp.float32), jnp.asarray(affine, jnp.float32))
  np.testing.assert_allclose(jax_vox, points_vox, atol=2e-3)


def test_vox_to_mm_matches_the_definition_column_by_column():
  affine = AFFINES["oblique_flipped_anisotropic"]
  np.testing.assert_allclose(geometry.vox_to_mm(np.zeros(3), affine), affine[:3, 3])
  for axis in range(3):
    step = geometry.vox_to_mm(np.eye(3)[axis], affine) - affine[:3, 3]
    np.testing.assert_allclose(step, affine[:3, axis])
  np.testing.assert_allclose(geometry.voxel_spacing_mm(affine), [0.7, 1.3, 2.9])


def test_batched_affines_broadcast_against_points():
  affines = np.stack([AFFINES["lps_aniso"], AFFINES["permuted_las"]])
  points = np.random.default_rng(1).normal(size=(2, 5, 3))
  batched = geometry.vox_to_mm(points, affines[:, None])
  for b in range(2):
    np.testing.assert_allclose(batched[b], geometry.vox_to_mm(points[b], affines[b]))
  np.testing.assert_allclose(geometry.mm_to_vox(batched, affines[:, None]), points, atol=1e-10)


def test_lps_ras_negates_x_and_y_and_is_its_own_inverse():
  p = np.array([[10.0, -20.0, 30.0]])
  np.testing.assert_array_equal(geometry.lps_to_ras(p), [[-10.0, 20.0, 30.0]])
  np.testing.assert_array_equal(geometry.ras_to_lps(geometry.lps_to_ras(p)), p)


@pytest.mark.parametrize("name", AFFINES)
def test_depth_in_grid_is_the_distance_to_the_nearest_face_of_the_voxels_box(name):
  """Voxel centres at 0 .. n-1, faces half a voxel beyond: depth = min over axes of the distance (mm along
  that axis) to the nearer face, negative outside; NumPy and JAX agree, on any affine."""
  affine, shape = AFFINES[name], (7, 10, 13)
  spacing = geometry.voxel_spacing_mm(affine)
  points_vox = np.array([[3.0, 4.5, 6.0],  # the centre: deepest along x (3.5 voxels to a face)
                         [0.0, 5.0, 6.0],  # the first voxel along x: half a voxel deep
                         [-0.5, 5.0, 6.0],  # on the face
                         [3.0, 11.5, 6.0],  # two voxels beyond the last along y
                         [3.0, 4.5, -3.5]])  # three voxels before the first along z
  expected = [min(3.5 * spacing[0], 5.0 * spacing[1], 6.5 * spacing[2]), 0.5 * spacing[0], 0.0,
              -2.0 * spacing[1], -3.0 * spacing[2]]
  points_mm = geometry.vox_to_mm(points_vox, affine)
  np.testing.assert_allclose(geometry.depth_in_grid_mm(points_mm, affine, shape), expected, atol=1e-9)
  on_device = jax.jit(geometry.depth_in_grid_mm, static_argnums=2)(
      jnp.asarray(points_mm, jnp.float32), jnp.asarray(affine, jnp.float32), shape)
  np.testing.assert_allclose(on_device, expected, atol=2e-3)
