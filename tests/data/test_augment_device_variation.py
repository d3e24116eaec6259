"""On-device variation (`augment_device` with `variation_device`): the defaults replay the plain augmentation
bit for bit, deformation and per-axis scale move image and landmarks together without folding, contrast
changes intensities not places, a field of view cuts a box and marks the landmarks outside absent."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from locnet_jax import geometry
from locnet_jax.data import augment_device, augment_host, variation, variation_device
from tests import helpers

STILL = {"max_rotation_deg": 0.0, "max_scale": 0.0, "max_translation_mm": 0.0, "max_gamma": 0.0,
         "max_intensity_scale": 0.0, "max_intensity_shift": 0.0, "noise_std": 0.0}  # no warp, no intensity change


def _texture(shape=(48, 48, 48), seed=0, floor=0.0):
  """A smooth random texture in [floor, 1] on an oblique, flipped, anisotropic grid (~1.5 mm) centred on the
  world origin: (volume, affine)."""
  affine = helpers.oblique_affine((20, -15, 30), (1.4, -1.6, 1.5), (0.0, 0.0, 0.0), order="xyz")
  affine[:3, 3] -= geometry.vox_to_mm((np.array(shape) - 1) / 2, affine)
  data = scipy.ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.5)
  data = floor + (1 - floor) * (data - data.min()) / (data.max() - data.min())
  return data.astype(np.float32), affine


def _batch(volume, affine, target, size):
  """`size` copies of a one-level case as a collated batch."""
  return {"volumes": [jnp.asarray(np.stack([volume] * size))],
          "affines": [jnp.asarray(np.stack([affine] * size), jnp.float32)],
          "target_mm": jnp.asarray(np.stack([target] * size), jnp.float32)}


def _augment(batch, key, settings):
  return jax.jit(functools.partial(augment_device.augment_batch, settings=settings))(batch, key)


def _value_at(volume, affine, points_mm):
  return scipy.ndimage.map_coordinates(volume, geometry.mm_to_vox(points_mm, affine).T, order=1)


def test_defaults_replay_the_plain_augmentation_bit_for_bit():
  """With every variation setting off, `augment_case` is today's draw composed by hand: the same key
  splits, transform, resampling, intensity change and noise, bit for bit; and every landmark is present."""
  rng = np.random.default_rng(0)
  affine = helpers.oblique_affine((25, -10, 40), (-1.2, 0.9, 2.0), (10.0, -20.0, 5.0), order="zyx")
  coarse = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
  volumes = [jnp.asarray(rng.uniform(0, 1, (16,) * 3), jnp.float32) for _ in range(2)]  # one shape: fewer compiles
  affines = [jnp.asarray(a, jnp.float32) for a in (coarse, affine)]
  center = geometry.vox_to_mm(np.full(3, 7.5), affine)
  target = jnp.asarray([center, center + 3.0, [np.nan] * 3], jnp.float32)
  settings = augment_host.AugmentSettings()  # rotation, scale, translation, gamma, intensity, noise: all on
  key = jax.random.key(7)
  moved, moved_target, present = augment_device.augment_case(volumes, affines, target, key, settings)
  k_warp, k_gamma, k_scale, k_shift, k_noise = jax.random.split(key, 5)
  transform = augment_device.random_transform(k_warp, settings, geometry.vox_to_mm(jnp.full(3, 7.5), affines[1]))
  gamma = jnp.exp(jax.random.uniform(k_gamma, (), minval=-settings.max_gamma, maxval=settings.max_gamma))
  scale = jax.random.uniform(k_scale, (), minval=1 - settings.max_intensity_scale,
                             maxval=1 + settings.max_intensity_scale)
  shift = jax.random.uniform(k_shift, (), minval=-settings.max_intensity_shift,
                             maxval=settings.max_intensity_shift)
  for level, (volume, a) in enumerate(zip(volumes, affines)):
    expected = jnp.clip(augment_device.transform_volume(volume, a, transform), 0, None) ** gamma * scale + shift
    expected = expected + settings.noise_std * jax.random.normal(jax.random.fold_in(k_noise, level), volume.shape)
    np.testing.assert_array_equal(np.asarray(moved[level]), np.asarray(expected))
  np.testing.assert_array_equal(np.asarray(moved_target), np.asarray(geometry.apply_affine(transform, target)))
  np.testing.assert_array_equal(np.asarray(present), [1.0, 1.0, np.nan])


def test_deformation_and_axis_scale_keep_image_and_landmarks_together():
  volume, affine = _texture()
  points = np.random.default_rng(1).uniform(-20, 20, (12, 3))
  anatomy = augment_host.AugmentSettings(**{**STILL, "max_rotation_deg": 10.0, "max_scale": 0.05,
                                            "max_translation_mm": 5.0}, deform_mm=8.0, deform_spacing_mm=(20.0, 40.0),
                                         max_axis_scale=0.1)
  key = jax.random.key(2)
  out = _augment(_batch(volume, affine, points, 1), key, anatomy)
  moved, target = np.asarray(out["volumes"][0][0]), np.asarray(out["target_mm"][0], np.float64)
  assert np.all(np.asarray(out["present"]) == 1) and np.all(np.isfinite(target))
  assert np.linalg.norm(target - points, axis=-1).max() > 3.0  # the landmarks really moved
  before = _value_at(volume, affine, points)
  after = _value_at(moved, affine, target)
  assert np.abs(after - before).max() < 0.02, (before, after)  # the image content moved with them
  wrong = _value_at(moved, affine, points)  # where they were: other content
  assert np.abs(wrong - before).mean() > 5 * np.abs(after - before).mean()
  k_warp = jax.random.split(jax.random.fold_in(key, 0), 5)[0]  # the case's transform, without the displacement
  transform = augment_device.random_transform(k_warp, anatomy, jnp.asarray(geometry.vox_to_mm(np.full(3, 23.5), affine),
                                                                           jnp.float32))
  rigid = geometry.apply_affine(np.asarray(transform, np.float64), points)
  assert np.linalg.norm(rigid - target, axis=-1).max() > 1.0  # the displacement moved them too


def test_contrast_changes_intensities_not_places():
  volume, affine = _texture((40, 40, 40))
  blob = helpers.blob_volume(affine, volume.shape, [[6.0, -4.0, 3.0]], [1.0], 5.0)
  settings = augment_host.AugmentSettings(**STILL, lut_probability=1.0, max_bias_log=0.3, max_blur_mm=2.0,
                                          thick_probability=1.0, max_thickness_mm=6.0)
  out = _augment(_batch(blob, affine, np.zeros((1, 3)), 4), jax.random.key(0), settings)
  grid = helpers.voxel_grid_mm(affine, blob.shape)
  for b in range(4):
    v = np.asarray(out["volumes"][0][b], np.float64)
    assert np.abs(v - blob).max() > 0.05  # the contrast changed
    centre = (grid * v[..., None]).sum((0, 1, 2)) / v.sum()
    assert np.linalg.norm(centre - [6.0, -4.0, 3.0]) < 1.5  # within a voxel: the blob stayed
  # blur and thick slices are scipy's on an oblique anisotropic grid, along every axis
  filtered = jax.jit(lambda v, a, axis: variation_device.blur_and_thick_slices(  # arguments, not constants to fold
      v, a, blur_mm=jnp.float32(1.3), thick=(jnp.bool_(True), axis, jnp.float32(5.2))))
  for axis in range(3):
    host = variation.thick_slices(variation.blur(volume, affine, 1.3), affine, axis=axis, thickness_mm=5.2)
    np.testing.assert_allclose(np.asarray(filtered(volume, jnp.asarray(affine, jnp.float32), axis)), host, atol=1e-5)
  # a lookup table can reorder two tissues' brightness (0.3 and 0.7), and keeps air (0) dark
  settings = augment_host.AugmentSettings(lut_probability=1.0)
  lut = lambda k: augment_device.contrast_draws(augment_device.variation_keys(k), settings=settings,
                                                lower_mm=jnp.zeros(3), upper_mm=jnp.ones(3))["lut"][1]
  luts = jax.jit(jax.vmap(lambda k: variation_device.apply_lut(jnp.array([0.0, 0.3, 0.7]), lut(k))))(
      jax.random.split(jax.random.key(1), 16))
  assert np.all(np.asarray(luts)[:, 0] == 0)
  dark, bright = np.asarray(luts)[:, 1], np.asarray(luts)[:, 2]
  assert np.any(dark > bright + 0.05) and np.any(dark < bright - 0.05)


def test_a_field_of_view_cuts_a_box_and_marks_the_landmarks_outside_absent():
  volume, affine = _texture((40, 40, 40), seed=5, floor=0.1)  # > 0 everywhere: zero means cut
  points = np.array([[0.0, 0.0, -22.0], [0.0, 0.0, 0.0], [0.0, 0.0, 22.0], [np.nan] * 3])
  settings = augment_host.AugmentSettings(**STILL, fov_probability=1.0, fov_slab_probability=1.0, fov_min_mm=15.0,
                                          fov_shift_mm=0.0)
  out = _augment(_batch(volume, affine, points, 12), jax.random.key(3), settings)
  inner = (slice(1, -1),) * 3  # the grid's outer voxels may fall just outside it under the (identity) warp
  grid = helpers.voxel_grid_mm(affine, volume.shape)[inner]
  seen = {0.0: 0, 1.0: 0}
  for b in range(12):
    v, present, target = np.asarray(out["volumes"][0][b])[inner], np.asarray(out["present"][b]), out["target_mm"][b]
    kept = grid[v != 0]
    lower, upper = kept.min(0), kept.max(0)
    assert 0.05 < (v == 0).mean() < 0.95  # part of the grid cut away, part kept
    np.testing.assert_array_equal(v != 0, np.all((grid >= lower) & (grid <= upper), -1))  # zero outside a box
    assert np.isnan(present[3]) and np.all(np.isnan(target[3]))  # unannotated stays unknown
    for k in range(3):
      if present[k] == 1:
        np.testing.assert_allclose(target[k], points[k], atol=1e-4)
        assert np.all((points[k] >= lower - 3) & (points[k] <= upper + 3))  # the box's edge is within a voxel
      else:
        assert present[k] == 0 and not np.all((points[k] >= lower) & (points[k] <= upper))
        np.testing.assert_allclose(target[k], points[k], atol=1e-4)  # cut away, on the grid: position kept
      seen[float(present[k])] += 1
  assert seen[0.0] > 0 and seen[1.0] > 0
  # the draws' distribution: the share of cases with a field of view, of slabs among them (twice the extent
  # along two axes, min_mm to half the extent along the third), the extra translation only with a box
  settings = augment_host.AugmentSettings(fov_probability=0.3, fov_slab_probability=0.5, fov_min_mm=20.0,
                                          fov_shift_mm=10.0)
  extent = jnp.array([100.0, 120.0, 80.0])
  shift, lower, upper = (np.asarray(x) for x in jax.jit(jax.vmap(lambda k: augment_device.field_of_view(
      k, settings, center_mm=jnp.zeros(3), extent_mm=extent)))(jax.random.split(jax.random.key(4), 1000)))
  on = np.all(np.isfinite(lower), -1)
  assert abs(on.mean() - 0.3) < 0.05 and np.all(np.isinf(upper[~on])) and np.all(shift[~on] == 0)
  assert np.abs(shift[on]).max() <= 10.0 and np.abs(shift[on]).max() > 9.5
  size, centre = upper[on] - lower[on], (upper[on] + lower[on]) / 2
  assert np.all(np.abs(centre) <= 0.1 * np.asarray(extent) + 1e-4)
  slab = np.sum(np.isclose(size, 2 * np.asarray(extent)), -1) == 2
  assert abs(slab.mean() - 0.5) < 0.1
  axis = np.argmin(size[slab] / np.asarray(extent), -1)
  thin, half = size[slab][np.arange(len(axis)), axis], 0.5 * np.asarray(extent)[axis]
  assert np.all((thin >= 20.0 - 1e-4) & (thin <= half + 1e-4)) and len(np.unique(axis)) == 3
  assert np.all((size[~slab] >= 20.0) & (size[~slab] <= np.asarray(extent) + 1e-4))


@pytest.mark.slow  # many programs to compile: over 25 s on 2 cores
def test_the_batch_under_jit_carries_presence_and_deformations_never_fold():
  volume, affine = _texture((24, 24, 24), seed=2)
  coarse = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
  target = np.array([[2.0, 1.0, 0.0], [np.nan] * 3, [np.nan] * 3, [200.0, 0.0, 0.0]])
  batch = {"volumes": [jnp.asarray(np.stack([volume[::2, ::2, ::2]] * 2)), jnp.asarray(np.stack([volume] * 2))],
           "affines": [jnp.asarray(np.stack([a] * 2), jnp.float32) for a in (coarse, affine)],
           "target_mm": jnp.asarray(np.stack([target] * 2), jnp.float32),
           "present": jnp.asarray([[1.0, 0.0, np.nan, 1.0], [1.0, np.nan, 0.0, 1.0]])}
  every = augment_host.AugmentSettings(deform_mm=3.0, max_axis_scale=0.08, lut_probability=0.5, max_bias_log=0.3,
                                       max_blur_mm=1.5, thick_probability=0.5, fov_probability=0.3,
                                       fov_shift_mm=0.0)  # the centre landmark stays on the 36 mm grid in any draw
  assert augment_host.host_only_fields(every) == []
  assert augment_host.host_only_fields(augment_host.AugmentSettings(elastic_mm=1.0)) == ["elastic_mm"]
  out = _augment(batch, jax.random.key(0), every)
  assert out["present"].dtype == jnp.float32 and out["present"].shape == (2, 4)
  np.testing.assert_array_equal(np.asarray(out["present"])[:, 1:], [[0.0, np.nan, 0.0], [np.nan, 0.0, 0.0]])
  assert set(np.asarray(out["present"])[:, 0].tolist()) <= {0.0, 1.0}
  # no position where the data set has none (incoming 0 or NaN) or off the grid (landmark 3, 200 mm out); the
  # centre landmark keeps its position whether or not a field of view cut it away
  np.testing.assert_array_equal(np.isnan(np.asarray(out["target_mm"])[..., 0]), [[False, True, True, True]] * 2)
  assert all(np.all(np.isfinite(np.asarray(v))) and v.shape == batch["volumes"][s].shape
             for s, v in enumerate(out["volumes"]))
  # the deformation's draws: the node step that of a spacing U(20, 40) mm on a 120 mm box, the amplitude capped by
  # it (15 mm asked), the field's slopes within the trilinear bound 2 a / step; and with a < step / 6 (slopes
  # < 1/3) no fold anywhere, inside the box or out, and the landmarks' fixed-point inversion converges: a moved
  # point's source is the original (the cap FOLD_FREE = 0.4 allows slopes to 0.8, where both can fail)
  points = jnp.asarray(np.random.default_rng(0).uniform(-75, 75, (20000, 3)), jnp.float32)
  landmarks = points[:8] * 0.6
  transform = jnp.asarray(helpers.affine([1.05, 0.95, 1.0], [3.0, -2.0, 1.0]), jnp.float32)

  def slopes(field, points, h=0.01):
    return jnp.stack([(field(points + h * e) - field(points - h * e)) / (2 * h) for e in jnp.eye(3)], -1)

  @jax.jit
  @functools.partial(jax.vmap, in_axes=(0, None, None, None))
  def draw(key, points, landmarks, transform):  # arguments, not constants XLA would fold
    box = {"lower_mm": jnp.full(3, -60.0), "upper_mm": jnp.full(3, 60.0), "spacing_range_mm": (20.0, 40.0)}
    capped = variation_device.random_displacement(key, **box, max_mm=15.0)
    used = jnp.all(jnp.stack(jnp.meshgrid(*[jnp.arange(n) for n in capped.values.shape[1:]], indexing="ij"))
                   < capped.nodes[:, None, None, None], axis=0)
    mild = variation_device.random_displacement(key, **box, max_mm=2.5)  # < 20 / 6
    moved = variation_device.move_points(landmarks, transform=transform, field=mild)
    source = geometry.apply_affine(jnp.linalg.inv(transform), moved + mild(moved))
    return (capped.step_mm, jnp.max(jnp.abs(capped.values) * used), jnp.abs(slopes(capped, points)).max(),
            jnp.abs(capped(points)).max(), jnp.linalg.det(slopes(mild, points) + jnp.eye(3)).min(),
            jnp.abs(source - landmarks).max())

  step, largest, slope, moves, det, error = (
      np.asarray(x) for x in draw(jax.random.split(jax.random.key(5), 8), points, landmarks, transform))
  np.testing.assert_allclose(step, 120 / np.round(120 / step), rtol=1e-5)  # a whole number of steps
  assert np.all((step >= 20 - 1e-4) & (step <= 40 + 1e-4)) and len(np.unique(step.round(3))) > 1
  step = step.min(-1)
  assert np.all(largest <= variation.FOLD_FREE * step + 1e-5) and np.all(largest > 0.9 * variation.FOLD_FREE * step)
  assert np.all(slope <= 2 * largest / step + 1e-3) and np.all(slope > 0.5 * largest / step)
  assert moves.min() > 2.5 and det.min() > 0
  assert error.max() < 1e-2


def test_a_marked_outside_moves_with_the_image_as_on_the_host():
  """outside_value < 0 on the device: the marker fills the moved image's outside and the field of view's cut,
  the intensity draws never touch it, and inside every voxel is the unmarked image's under the same key."""
  volume, affine = _texture((32, 32, 32), seed=9, floor=0.1)
  band = np.zeros(volume.shape, bool)
  band[5:-5, 5:-5, 5:-5] = True
  marked, zeroed = np.where(band, volume, -1.0), np.where(band, volume, 0.0)
  points = np.zeros((1, 3))
  settings = dict(max_rotation_deg=15.0, max_translation_mm=6.0, max_intensity_shift=0.3, noise_std=0.05,
                  lut_probability=1.0, fov_probability=0.5, fov_min_mm=15.0, fov_shift_mm=0.0)
  key = jax.random.key(11)
  a = _augment(_batch(marked, affine, points, 6), key, augment_host.AugmentSettings(**settings, outside_value=-1.0))
  b = _augment(_batch(zeroed, affine, points, 6), key, augment_host.AugmentSettings(**settings))
  va, vb = np.asarray(a["volumes"][0]), np.asarray(b["volumes"][0])
  outside = va == -1.0
  assert outside.mean() > 0.3 and va[~outside].min() > -0.5
  inner = ~outside & np.asarray([scipy.ndimage.binary_erosion(~o, iterations=2) for o in outside])
  assert inner.mean() > 0.1
  np.testing.assert_allclose(va[inner], vb[inner], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(a["present"]), np.asarray(b["present"]))
