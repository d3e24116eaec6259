"""Variation beyond one template: deformations that never fold, contrast that reorders tissues but keeps
every voxel where it was, fields of view that cut landmarks away and say so; image and landmarks together."""

import numpy as np
import pytest
import scipy.ndimage

from locnet_jax import geometry
from locnet_jax.data import augment_host, loader, preprocess, variation
from tests import helpers

ANATOMY = augment_host.AugmentSettings(max_rotation_deg=10.0, max_scale=0.05, max_translation_mm=5.0, max_gamma=0.0,
                                       max_intensity_scale=0.0, max_intensity_shift=0.0, noise_std=0.0,
                                       deform_mm=8.0, deform_spacing_mm=(20.0, 40.0), max_axis_scale=0.1)


def _texture_pyramid(seed=0):
  """A smooth random texture on an oblique, flipped, anisotropic grid (~1.5 mm), as one-level pyramid."""
  affine = helpers.oblique_affine((20, -15, 30), (1.4, -1.6, 1.5), (0.0, 0.0, 0.0), order="xyz")
  affine[:3, 3] -= geometry.vox_to_mm(np.array([23.5] * 3), affine)  # grid centred on the world origin
  rng = np.random.default_rng(seed)
  data = scipy.ndimage.gaussian_filter(rng.standard_normal((48, 48, 48)), 2.5)
  data = (data - data.min()) / (data.max() - data.min())
  return preprocess.Pyramid((data.astype(np.float32),), (affine,))


def _value_at(volume, affine, points_mm):
  return scipy.ndimage.map_coordinates(volume, geometry.mm_to_vox(points_mm, affine).T, order=1)


def test_a_random_displacement_never_folds_space():
  rng = np.random.default_rng(0)
  field = variation.random_displacement(rng, lower_mm=[-60] * 3, upper_mm=[60] * 3, spacing_mm=20.0, max_mm=15.0)
  assert np.abs(field.values_mm).max() <= variation.FOLD_FREE * 20.0 + 1e-9  # capped: 15 mm asked, 3.3 given
  # random points, not a grid aligned with the node cells (where a folding field can still look fine)
  grid = np.random.default_rng(1).uniform(-58, 58, (200_000, 3))
  h = 0.05
  jacobian = np.stack([((grid + h * e + field(grid + h * e)) - (grid - h * e + field(grid - h * e))) / (2 * h)
                       for e in np.eye(3)], -1)  # (N, 3, 3) of x -> x + d(x)
  assert np.linalg.det(jacobian).min() > 0
  assert np.abs(field(grid)).max() > 2.5  # and it really moves things by several mm


def test_deformation_and_anatomy_keep_image_and_landmarks_together():
  pyramid = _texture_pyramid()
  points = np.random.default_rng(1).uniform(-20, 20, (12, 3))
  out = augment_host.augment_case(pyramid, points, np.random.default_rng(2), ANATOMY)
  moved, affine = out.pyramid.volumes[0], out.pyramid.affines[0]
  assert np.all(out.present == 1) and np.all(np.isfinite(out.target_mm))
  displacement = np.linalg.norm(out.target_mm - points, axis=-1)
  assert displacement.max() > 3.0  # the landmarks really moved
  before = _value_at(pyramid.volumes[0], affine, points)
  after = _value_at(moved, affine, out.target_mm)
  assert np.abs(after - before).max() < 0.02, (before, after)  # the image content moved with them
  wrong = _value_at(moved, affine, points)  # where they were: other content
  assert np.abs(wrong - before).mean() > 5 * np.abs(after - before).mean()


def test_contrast_changes_intensities_not_places():
  pyramid = _texture_pyramid(3)
  settings = augment_host.AugmentSettings(max_rotation_deg=0.0, max_scale=0.0, max_translation_mm=0.0, max_gamma=0.0,
                                          max_intensity_scale=0.0, max_intensity_shift=0.0, noise_std=0.0,
                                          lut_probability=1.0, lut_knots=8)
  out = augment_host.augment_case(pyramid, np.zeros((1, 3)), np.random.default_rng(4), settings)
  inner = (slice(1, -1),) * 3  # the grid's outer voxels may fall just outside it under the (identity) warp
  original, remapped = pyramid.volumes[0][inner].ravel(), out.pyramid.volumes[0][inner].ravel()
  order = np.argsort(original)
  # a function of the intensity, voxel by voxel: along sorted intensities the output moves no faster than
  # the steepest a lookup table of 8 knots on [0, 1] can (7 per unit); a spatial change would break this
  steps = np.abs(np.diff(remapped[order]))
  assert np.all(steps <= 7.0 * np.diff(original[order]) + 1e-5)
  # ... and not monotone: some brighter tissue became darker than some darker one
  assert np.any(np.diff(remapped[order]) < -1e-3) and np.any(np.diff(remapped[order]) > 1e-3)


def test_a_field_of_view_cuts_the_image_and_marks_the_landmarks_outside_absent():
  pyramid = _texture_pyramid(5)
  points = np.array([[0.0, 0.0, -25.0], [0.0, 0.0, 0.0], [0.0, 0.0, 25.0], [np.nan] * 3])
  settings = augment_host.AugmentSettings(max_rotation_deg=0.0, max_scale=0.0, max_translation_mm=0.0,
                                          noise_std=0.0, max_gamma=0.0, max_intensity_scale=0.0,
                                          max_intensity_shift=0.0, fov_probability=1.0, fov_slab_probability=1.0,
                                          fov_min_mm=20.0, fov_shift_mm=0.0)
  seen = {0: 0, 1: 0}
  for seed in range(12):
    out = augment_host.augment_case(pyramid, points, np.random.default_rng(seed), settings)
    volume, affine = out.pyramid.volumes[0], out.pyramid.affines[0]
    assert np.isnan(out.present[3]) and np.all(np.isnan(out.target_mm[3]))  # unannotated stays unknown
    for k in range(3):
      value = _value_at(volume, affine, points[k:k + 1])[0]
      if out.present[k] == 1:
        np.testing.assert_allclose(out.target_mm[k], points[k])
        assert value > 0
        seen[1] += 1
      else:
        assert out.present[k] == 0 and value == 0
        np.testing.assert_allclose(out.target_mm[k], points[k])  # cut away, on the grid: its position is kept
        seen[0] += 1
    assert (volume == 0).mean() > 0.2  # part of the grid is outside the field of view
  assert seen[0] > 0 and seen[1] > 0


def test_defaults_draw_what_they_always_drew():
  """With every new setting off, the random stream and the result are the plain augmentation's."""
  pyramid = _texture_pyramid(6)
  plain = augment_host.AugmentSettings()
  a = augment_host.augment_case(pyramid, np.zeros((1, 3)), np.random.default_rng((0, 1, 2)), plain)
  b = augment_host.augment(pyramid, np.zeros((1, 3)), np.random.default_rng((0, 1, 2)), plain)
  np.testing.assert_array_equal(a.pyramid.volumes[0], b[0].volumes[0])
  rng = np.random.default_rng((0, 1, 2))
  center = geometry.vox_to_mm((np.array([47.0] * 3)) / 2, pyramid.affines[0])
  np.testing.assert_array_equal(a.transform, augment_host.random_transform(rng, plain, center))


def test_presence_reaches_the_batch_through_the_loaders_workers():
  pyramid = _texture_pyramid(7)
  settings = augment_host.AugmentSettings(noise_std=0.0, fov_probability=1.0, fov_slab_probability=1.0,
                                          fov_min_mm=15.0, fov_shift_mm=20.0)
  points = np.array([[0.0, 0.0, -25.0], [0.0, 0.0, 25.0]])
  examples = [loader.Example(f"c{i}", pyramid, points) for i in range(4)]
  batches = {}
  for workers in (0, 1):
    with loader.Loader(examples, batch_size=4, seed=0, augment=settings, workers=workers) as source:
      batches[workers] = list(source.epoch(0))[0]
  np.testing.assert_array_equal(batches[0]["present"], batches[1]["present"])
  present = batches[0]["present"]
  assert set(np.unique(present)) <= {0.0, 1.0} and 0 < present.sum() < present.size
  # a landmark cut away by the field of view keeps its position (the model learns where it lies beyond the edge)
  np.testing.assert_array_equal(batches[0]["target_mm"], batches[1]["target_mm"])
  assert np.isfinite(batches[0]["target_mm"][present == 0]).all(axis=-1).any()


@pytest.mark.parametrize("present", [None, np.array([1.0, 0.0])])
def test_an_example_says_which_landmarks_are_in_its_image(present):
  target = np.array([[1.0, 2.0, 3.0], [np.nan] * 3])
  example = loader.Example("c", _texture_pyramid(), target, present)
  expected = [1.0, np.nan] if present is None else [1.0, 0.0]
  np.testing.assert_array_equal(example.presence(), expected)


@pytest.mark.parametrize("oblique", [False, True])
def test_a_field_on_a_grid_is_the_field_at_its_voxel_centres(oblique):
  """The separable evaluation (world-aligned grids) and the general one give `field(voxel_centres_mm)`,
  beyond the nodes' box too (clamped to the edge nodes), for any block of rows."""
  rng = np.random.default_rng(3)
  field = variation.random_displacement(rng, lower_mm=[-20.0, -30.0, -10.0], upper_mm=[25.0, 20.0, 30.0],
                                        spacing_mm=12.0, max_mm=2.0)
  affine = (helpers.oblique_affine((20, -15, 30), (1.4, -1.6, 2.5), (-30.0, 25.0, -15.0), order="xyz") if oblique
            else helpers.affine([1.4, 1.6, 2.5], [-30.0, 25.0, -15.0], np.eye(3), [1, -1, 1]))  # y flipped
  shape = (40, 36, 22)  # reaches beyond the nodes' box on every side
  expected = field(variation.voxel_centres_mm(affine, shape)).reshape(*shape, 3)
  np.testing.assert_allclose(field.on_grid(affine, shape), expected, atol=1e-9)
  np.testing.assert_allclose(field.on_grid(affine, shape, slice(7, 19)), expected[7:19], atol=1e-9)


def test_the_fast_warp_equals_resampling_through_the_world_map():
  pyramid = _texture_pyramid(8)
  affine = helpers.affine([1.5, 1.5, 1.5], [-35.0, 36.0, -35.0], np.eye(3), [1, -1, 1])  # as a pyramid level's
  volume = pyramid.volumes[0]
  rng = np.random.default_rng(9)
  field = variation.random_displacement(rng, lower_mm=[-40.0] * 3, upper_mm=[40.0] * 3, spacing_mm=20.0, max_mm=3.0)
  transform = augment_host.random_transform(rng, augment_host.AugmentSettings(), np.zeros(3))
  slow = preprocess.resample(volume, affine, target_affine=affine, target_shape=volume.shape,
                             world_map=augment_host.source_points(transform, field))
  fast = augment_host.warp_volume(volume, affine, transform, field, slab=20)
  assert (slow == 0).mean() > 0.01  # part of the grid was moved in from outside the image
  np.testing.assert_allclose(fast, slow, atol=2e-6)


def _marked(pyramid, outside_value=-1.0, band=6):
  """The pyramid with its outer `band` voxels outside the image (the marker)."""
  volume = np.full_like(pyramid.volumes[0], outside_value)
  inner = (slice(band, -band),) * 3
  volume[inner] = pyramid.volumes[0][inner]
  return preprocess.Pyramid((volume,), pyramid.affines)


def test_a_marked_outside_moves_with_the_image_and_the_intensity_draws_never_touch_it():
  """With outside_value < 0 the image's edge moves with the image and the field of view's box is cut to the
  marker; inside, every voxel is what the same draw gives the unmarked image."""
  base = _texture_pyramid(8)
  zero_band = _marked(base, 0.0)
  marked = _marked(base, -1.0)
  settings = dict(max_rotation_deg=15.0, max_translation_mm=8.0, max_intensity_shift=0.3, noise_std=0.05,
                  lut_probability=1.0, max_bias_log=0.3, fov_probability=0.5, fov_min_mm=20.0, fov_shift_mm=0.0)
  grid = helpers.voxel_grid_mm(base.affines[0], base.volumes[0].shape)
  cut = 0
  for seed in range(6):
    draw = lambda p, v: augment_host.augment_case(p, np.zeros((1, 3)), np.random.default_rng(seed),  # noqa: E731
                                                  augment_host.AugmentSettings(**settings, outside_value=v))
    a, b = draw(marked, -1.0), draw(zero_band, 0.0)
    np.testing.assert_array_equal(a.transform, b.transform)  # the marker draws nothing
    volume = a.pyramid.volumes[0]
    source_vox = geometry.mm_to_vox(geometry.apply_affine(np.linalg.inv(a.transform), grid), base.affines[0])
    inner_gap = np.min(np.minimum(source_vox - 6, 41 - source_vox), axis=-1)  # > 0: from the image's inside
    outside = volume == -1.0
    assert np.all(outside[inner_gap < -1]) and outside.mean() > 0.2
    kept = ~outside & (inner_gap > 1)
    assert kept.mean() > 0.1 and volume[~outside].min() > -0.5  # shifts and noise stay far from the marker
    np.testing.assert_allclose(volume[kept], b.pyramid.volumes[0][kept], atol=1e-5)
    cut += int(np.sum(outside & (inner_gap > 1)) > 0)  # a field of view cut inside the image
  assert cut > 0
