"""Training-time augmentation on the accelerator: `augment_host.augment_case`'s random warp, variation and
intensity changes, in JAX, applied to a batch already on the device (every setting but `elastic_mm`).

Why: resampling a 448^3 pyramid on the CPU (scipy, `augment_host.augment`) takes hundreds of GPU
training steps per volume and worker (docs/performance.md); on the device the same trilinear
resampling is a gather over the volume. The draws have the same distributions as the host's, in its order:
a world transform T (rotation about the finest grid's centre, uniform per axis in degrees, extrinsic
x-y-z as scipy's "xyz"; isotropic and per-axis scale; translation), a smooth displacement d
(`deform_mm`, `variation_device.random_displacement`), a field of view (extra translation and a box);
then per case the contrast (lookup table, bias field, blur, thick slices), gamma, intensity scale and
shift applied to every level alike, Gaussian noise per level, and the field of view's cut. Values come
from a JAX key, so a run is replayed exactly from (seed, step); a variation setting draws (from its own key,
off the case key's old stream) only when on, so the draws of the settings without it are unchanged.
Frames: volumes (B, X, Y, Z) voxel-indexed, affines voxel -> RAS mm, landmarks RAS mm; the moved image
at world point p is the old one at inv(T)(p + d(p)), on the same grid (affines unchanged), and a landmark
l moves to the p where inv(T)(p + d(p)) = l (T(l) without d), present if inside the finest grid's box and
the field of view; off the grid its target is NaN, cut away by the field of view it keeps its position (as
on the host: the model learns where a landmark lies beyond the image's edge).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from locnet_jax import geometry
from locnet_jax.data import variation_device
from locnet_jax.data.augment_host import AugmentSettings

# new draws, off the old stream: the per-axis scale from fold_in(k_warp, AXIS_SCALE), the other variation settings
# each from its own of split(fold_in(key, VARIATION), 6), indexed by these (few threefry calls: compiles faster)
AXIS_SCALE, VARIATION = 101, 102
DEFORM, FOV, LUT, BIAS, BLUR, THICK = range(6)


def rotation_xyz(angles_rad: jax.Array) -> jax.Array:
  """(3,) angles -> (3, 3) rotation about the fixed x, then y, then z axes: Rz @ Ry @ Rx."""
  c, s = jnp.cos(angles_rad), jnp.sin(angles_rad)
  one, zero = jnp.ones(()), jnp.zeros(())
  rx = jnp.array([[one, zero, zero], [zero, c[0], -s[0]], [zero, s[0], c[0]]])
  ry = jnp.array([[c[1], zero, s[1]], [zero, one, zero], [-s[1], zero, c[1]]])
  rz = jnp.array([[c[2], -s[2], zero], [s[2], c[2], zero], [zero, zero, one]])
  return rz @ ry @ rx


def random_transform(key: jax.Array, settings: AugmentSettings, center_mm: jax.Array) -> jax.Array:
  """World -> world (4, 4): rotate and scale (isotropic, then per axis U(1 - s, 1 + s) for
  `max_axis_scale` s) about `center_mm` (3,) RAS mm, then translate."""
  k_rot, k_scale, k_shift = jax.random.split(key, 3)
  angles = jnp.deg2rad(jax.random.uniform(k_rot, (3,), minval=-1.0, maxval=1.0) * settings.max_rotation_deg)
  scale = jax.random.uniform(k_scale, (), minval=1 - settings.max_scale, maxval=1 + settings.max_scale)
  linear = rotation_xyz(angles) * scale
  if settings.max_axis_scale:
    axis_scale = jax.random.uniform(jax.random.fold_in(key, AXIS_SCALE), (3,), minval=1 - settings.max_axis_scale,
                                    maxval=1 + settings.max_axis_scale)
    linear = linear * axis_scale  # = linear @ diag(axis_scale)
  shift = jax.random.uniform(k_shift, (3,), minval=-1.0, maxval=1.0) * settings.max_translation_mm
  translation = center_mm - linear @ center_mm + shift
  return jnp.eye(4).at[:3, :3].set(linear).at[:3, 3].set(translation)


def transform_volume(volume: jax.Array, affine: jax.Array, transform: jax.Array, *,
                     field: variation_device.NodeField | None = None, max_points: int = 1 << 21) -> jax.Array:
  """(X, Y, Z) image moved by the world transform (4, 4), on its own grid: the new image at world p is the
  old one at inv(transform)(p), or at inv(transform)(p + field(p)) with a displacement `field` (RAS mm);
  trilinear, 0 where the source point lies outside the old grid (as `augment_host.transform_volume`,
  whose values it reproduces, and `preprocess.resample` with `augment_host.source_points`).

  Computed in slabs of x-slices of at most `max_points` voxels (one slice at least), so the coordinates
  held at once are ~3 x `max_points` floats (24 MB by default: a 128^3 volume in one slab, a 448^3 one 10
  slices at a time).
  """
  vox_map = jnp.linalg.inv(affine) @ jnp.linalg.inv(transform) @ affine  # new voxel -> old voxel
  world_to_old = None if field is None else jnp.linalg.inv(affine) @ jnp.linalg.inv(transform)
  ny, nz = volume.shape[1:]
  upper = jnp.asarray(volume.shape, jnp.float32) - 1
  yz = jnp.stack(jnp.meshgrid(jnp.arange(ny, dtype=jnp.float32), jnp.arange(nz, dtype=jnp.float32),
                              indexing="ij"), -1)  # (Y, Z, 2)

  def one_slice(x):
    new_vox = jnp.concatenate([jnp.full((ny, nz, 1), x, jnp.float32), yz], -1)
    if field is None:
      old_vox = new_vox @ vox_map[:3, :3].T + vox_map[:3, 3]
    else:
      world = new_vox @ affine[:3, :3].T + affine[:3, 3]
      old_vox = (world + field(world)) @ world_to_old[:3, :3].T + world_to_old[:3, 3]
    values = jax.scipy.ndimage.map_coordinates(volume, list(jnp.moveaxis(old_vox, -1, 0)), order=1, mode="nearest")
    inside = jnp.all((old_vox >= 0) & (old_vox <= upper), axis=-1)  # as scipy's mode="constant": 0 outside
    return jnp.where(inside, values, 0.0)

  xs = jnp.arange(volume.shape[0], dtype=jnp.float32)
  slab = max(1, min(volume.shape[0], max_points // (ny * nz)))
  return jax.lax.map(one_slice, xs, batch_size=slab)


def _varied(settings: AugmentSettings) -> bool:
  return bool(settings.deform_mm > 0 or settings.fov_probability or settings.lut_probability or settings.max_bias_log
              or settings.max_blur_mm or settings.thick_probability)


def variation_keys(key: jax.Array) -> jax.Array:
  """(6,) keys of a case's variation draws, indexed by DEFORM, FOV, LUT, BIAS, BLUR, THICK."""
  return jax.random.split(jax.random.fold_in(key, VARIATION), 6)


def field_of_view(key: jax.Array, settings: AugmentSettings, *, center_mm: jax.Array, extent_mm: jax.Array):
  """The case's field of view, drawn with `fov_probability`: (extra translation (3,) mm, box lower (3,), box
  upper (3,) RAS mm); no translation and an infinite box when not drawn."""
  u = jax.random.uniform(key, (13,))
  on, shift = u[0] < settings.fov_probability, (2 * u[1:4] - 1) * settings.fov_shift_mm
  lower, upper = variation_device.random_field_of_view(u[4:], center_mm=center_mm, extent_mm=extent_mm,
                                                       min_mm=settings.fov_min_mm,
                                                       slab_probability=settings.fov_slab_probability)
  return jnp.where(on, shift, 0.0), jnp.where(on, lower, -jnp.inf), jnp.where(on, upper, jnp.inf)


def contrast_draws(keys: jax.Array, *, settings: AugmentSettings, lower_mm: jax.Array, upper_mm: jax.Array) -> dict:
  """The case's contrast draws (one for every level), as `augment_host._contrast`, a setting off drawing nothing:
  "lut": (on, (knots,) table), "bias": the log field over the box [lower_mm, upper_mm] RAS mm, "blur_mm": std,
  "thick": (on, voxel axis, thickness mm). `keys`: the case's variation keys (`variation_keys`)."""
  draws = {}
  if settings.lut_probability:  # as `variation.random_lut`: 0 at 0, the other knots U(0, 1)
    u = jax.random.uniform(keys[LUT], (1 + settings.lut_knots,))
    draws["lut"] = (u[0] < settings.lut_probability, u[1:].at[0].set(0.0))
  if settings.max_bias_log:
    draws["bias"] = variation_device.smooth_log_field(keys[BIAS], lower_mm=lower_mm,
                                                      upper_mm=upper_mm, max_log=settings.max_bias_log)
  if settings.max_blur_mm:
    draws["blur_mm"] = jax.random.uniform(keys[BLUR], (), maxval=settings.max_blur_mm)
  if settings.thick_probability:
    u = jax.random.uniform(keys[THICK], (3,))  # on, axis (0, 1, 2 alike), thickness U(2, t)
    draws["thick"] = (u[0] < settings.thick_probability, jnp.minimum(jnp.floor(3 * u[1]), 2),
                      2.0 + (settings.max_thickness_mm - 2.0) * u[2])
  return draws


def _apply_contrast(volume: jax.Array, affine: jax.Array, draws: dict) -> jax.Array:
  """Lookup table, bias field, blur, thick slices, in the host's order, on one level (X, Y, Z)."""
  if "lut" in draws:
    on, lut = draws["lut"]
    volume = jnp.where(on, variation_device.apply_lut(volume, lut), volume)
  if "bias" in draws:
    volume = volume * jnp.exp(variation_device.field_on_grid(draws["bias"], affine, volume.shape))
  if "blur_mm" in draws or "thick" in draws:
    volume = variation_device.blur_and_thick_slices(volume, affine, blur_mm=draws.get("blur_mm"),
                                                    thick=draws.get("thick"))
  return volume


def augment_case(volumes, affines, target_mm: jax.Array, key: jax.Array, settings: AugmentSettings):
  """One case: volumes S x (X, Y, Z), affines S x (4, 4), target_mm (K, 3) RAS mm -> (moved volumes,
  moved target_mm (K, 3) (NaN off the finest grid's box), present (K,): 1 inside the finest grid's box and
  the field of view, 0 annotated but outside, NaN unannotated (a NaN row))."""
  if settings.elastic_mm > 0:
    raise ValueError("device augmentation has no elastic part: use elastic_mm=0 (deform_mm instead) or the host "
                     "loader")
  k_warp, k_gamma, k_scale, k_shift, k_noise = jax.random.split(key, 5)
  fine = affines[-1]
  center_mm = geometry.vox_to_mm((jnp.asarray(volumes[-1].shape, jnp.float32) - 1) / 2, fine)
  lower, upper = variation_device.grid_box_mm(fine, volumes[-1].shape)
  transform = random_transform(k_warp, settings, center_mm)
  gamma = jnp.exp(jax.random.uniform(k_gamma, (), minval=-settings.max_gamma, maxval=settings.max_gamma))
  scale = jax.random.uniform(k_scale, (), minval=1 - settings.max_intensity_scale,
                             maxval=1 + settings.max_intensity_scale)
  shift = jax.random.uniform(k_shift, (), minval=-settings.max_intensity_shift, maxval=settings.max_intensity_shift)
  keys = variation_keys(key) if _varied(settings) else None
  field = None
  if settings.deform_mm > 0:
    field = variation_device.random_displacement(keys[DEFORM], lower_mm=lower, upper_mm=upper,
                                                 spacing_range_mm=settings.deform_spacing_mm,
                                                 max_mm=settings.deform_mm)
  fov = None
  if settings.fov_probability:
    fov_shift, *fov = field_of_view(keys[FOV], settings, center_mm=center_mm, extent_mm=upper - lower)
    transform = transform.at[:3, 3].add(fov_shift)
  contrast = contrast_draws(keys, settings=settings, lower_mm=lower, upper_mm=upper)
  moved = []
  mark = settings.outside_value
  for level, (volume, affine) in enumerate(zip(volumes, affines)):
    volume = volume.astype(jnp.float32)
    image_mask = None if mark == 0 else volume > mark / 2  # as `preprocess.split_outside`
    if image_mask is not None:
      volume = jnp.where(image_mask, jnp.maximum(volume, 0), 0.0)
    v = transform_volume(volume, affine, transform, field=field)
    v = _apply_contrast(v, affine, contrast)
    v = jnp.clip(v, 0, None) ** gamma * scale + shift
    if settings.noise_std:
      v = v + settings.noise_std * jax.random.normal(jax.random.fold_in(k_noise, level), v.shape)
    keep = None
    if image_mask is not None:
      keep = transform_volume(image_mask.astype(jnp.float32), affine, transform, field=field) > 0.5
    if fov is not None:
      in_box = variation_device.box_mask(affine, v.shape, *fov)
      keep = in_box if keep is None else keep & in_box
    if keep is not None:
      v = jnp.where(keep, v, mark)
    moved.append(v)
  if field is None:
    moved_target = geometry.apply_affine(transform, target_mm)
  else:
    moved_target = variation_device.move_points(target_mm, transform=transform, field=field)
  on_grid = variation_device.inside(moved_target, lower, upper)
  seen = on_grid if fov is None else on_grid & variation_device.inside(moved_target, *fov)
  present = jnp.where(jnp.all(jnp.isfinite(moved_target), axis=-1), seen.astype(jnp.float32), jnp.nan)
  return moved, jnp.where(on_grid[:, None], moved_target, jnp.nan), present


def augment_batch(batch: dict, key: jax.Array, *, settings: AugmentSettings) -> dict:
  """A collated batch (volumes S x (B, X, Y, Z), affines S x (B, 4, 4), target_mm (B, K, 3), optionally
  present (B, K)) with every case augmented by its own key (``fold_in(key, b)``); affines unchanged.
  Sets present (B, K) float32: the case's own (`augment_case`) where the incoming one (if any) is 1, else the
  incoming one (0 stays 0, NaN stays NaN); target_mm is NaN where the incoming presence is not 1 (a data
  set's absent landmark has no known position) or the case's moved landmark is off the grid."""
  size = batch["target_mm"].shape[0]
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(size))
  volumes, target, present = jax.vmap(lambda v, a, t, k: augment_case(v, a, t, k, settings))(
      list(batch["volumes"]), list(batch["affines"]), batch["target_mm"], keys)
  if batch.get("present") is not None:
    incoming = jnp.asarray(batch["present"], jnp.float32)
    present = jnp.where(incoming == 1, present, incoming)
    target = jnp.where((incoming == 1)[..., None], target, jnp.nan)
  return {**batch, "volumes": volumes, "target_mm": target, "present": present}
