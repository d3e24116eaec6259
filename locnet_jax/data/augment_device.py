"""Training-time augmentation on the accelerator: `augment_host.augment`'s random warp and intensity
changes, in JAX, applied to a batch already on the device (no elastic part).

Why: resampling a 448^3 pyramid on the CPU (scipy, `augment_host.augment`) takes hundreds of GPU
training steps per volume and worker (docs/performance.md); on the device the same trilinear
resampling is a gather over the volume. The draw has the same distribution as the host's (rotation about the finest grid's centre,
uniform per axis in degrees, extrinsic x-y-z as scipy's "xyz"; isotropic scale; translation; gamma,
intensity scale and shift drawn once per case; Gaussian noise per level); values come from a JAX key,
so a run is replayed exactly from (seed, step). Frames: volumes (B, X, Y, Z) voxel-indexed, affines
voxel -> RAS mm, landmarks RAS mm; the moved image at world point p is the old one at inv(T)(p), on the
same grid (affines unchanged), and the landmarks move to T(l).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from locnet_jax import geometry
from locnet_jax.data.augment_host import AugmentSettings


def rotation_xyz(angles_rad: jax.Array) -> jax.Array:
  """(3,) angles -> (3, 3) rotation about the fixed x, then y, then z axes: Rz @ Ry @ Rx."""
  c, s = jnp.cos(angles_rad), jnp.sin(angles_rad)
  one, zero = jnp.ones(()), jnp.zeros(())
  rx = jnp.array([[one, zero, zero], [zero, c[0], -s[0]], [zero, s[0], c[0]]])
  ry = jnp.array([[c[1], zero, s[1]], [zero, one, zero], [-s[1], zero, c[1]]])
  rz = jnp.array([[c[2], -s[2], zero], [s[2], c[2], zero], [zero, zero, one]])
  return rz @ ry @ rx


def random_transform(key: jax.Array, settings: AugmentSettings, center_mm: jax.Array) -> jax.Array:
  """World -> world (4, 4): rotate and scale about `center_mm` (3,) RAS mm, then translate."""
  k_rot, k_scale, k_shift = jax.random.split(key, 3)
  angles = jnp.deg2rad(jax.random.uniform(k_rot, (3,), minval=-1.0, maxval=1.0) * settings.max_rotation_deg)
  scale = jax.random.uniform(k_scale, (), minval=1 - settings.max_scale, maxval=1 + settings.max_scale)
  linear = rotation_xyz(angles) * scale
  shift = jax.random.uniform(k_shift, (3,), minval=-1.0, maxval=1.0) * settings.max_translation_mm
  translation = center_mm - linear @ center_mm + shift
  return jnp.eye(4).at[:3, :3].set(linear).at[:3, 3].set(translation)


def transform_volume(volume: jax.Array, affine: jax.Array, transform: jax.Array, *,
                     max_points: int = 1 << 21) -> jax.Array:
  """(X, Y, Z) image moved by the world transform (4, 4), on its own grid; trilinear, 0 where the source
  point lies outside the old grid (as `augment_host.transform_volume`, whose values it reproduces).

  Computed in slabs of x-slices of at most `max_points` voxels (one slice at least), so the coordinates
  held at once are ~3 x `max_points` floats (24 MB by default: a 128^3 volume in one slab, a 448^3 one 10
  slices at a time).
  """
  vox_map = jnp.linalg.inv(affine) @ jnp.linalg.inv(transform) @ affine  # new voxel -> old voxel
  ny, nz = volume.shape[1:]
  upper = jnp.asarray(volume.shape, jnp.float32) - 1
  yz = jnp.stack(jnp.meshgrid(jnp.arange(ny, dtype=jnp.float32), jnp.arange(nz, dtype=jnp.float32),
                              indexing="ij"), -1)  # (Y, Z, 2)

  def one_slice(x):
    new_vox = jnp.concatenate([jnp.full((ny, nz, 1), x, jnp.float32), yz], -1)
    old_vox = new_vox @ vox_map[:3, :3].T + vox_map[:3, 3]
    values = jax.scipy.ndimage.map_coordinates(volume, list(jnp.moveaxis(old_vox, -1, 0)), order=1, mode="nearest")
    inside = jnp.all((old_vox >= 0) & (old_vox <= upper), axis=-1)  # as scipy's mode="constant": 0 outside
    return jnp.where(inside, values, 0.0)

  xs = jnp.arange(volume.shape[0], dtype=jnp.float32)
  slab = max(1, min(volume.shape[0], max_points // (ny * nz)))
  return jax.lax.map(one_slice, xs, batch_size=slab)


def augment_case(volumes, affines, target_mm: jax.Array, key: jax.Array, settings: AugmentSettings):
  """One case: volumes S x (X, Y, Z), affines S x (4, 4), target_mm (K, 3) (NaN rows stay NaN) ->
  (moved volumes, moved target_mm)."""
  if settings.elastic_mm > 0:
    raise ValueError("device augmentation has no elastic part: use elastic_mm=0 or the host loader")
  k_warp, k_gamma, k_scale, k_shift, k_noise = jax.random.split(key, 5)
  fine = affines[-1]
  center_mm = geometry.vox_to_mm((jnp.asarray(volumes[-1].shape, jnp.float32) - 1) / 2, fine)
  transform = random_transform(k_warp, settings, center_mm)
  gamma = jnp.exp(jax.random.uniform(k_gamma, (), minval=-settings.max_gamma, maxval=settings.max_gamma))
  scale = jax.random.uniform(k_scale, (), minval=1 - settings.max_intensity_scale,
                             maxval=1 + settings.max_intensity_scale)
  shift = jax.random.uniform(k_shift, (), minval=-settings.max_intensity_shift, maxval=settings.max_intensity_shift)
  moved = []
  for level, (volume, affine) in enumerate(zip(volumes, affines)):
    v = transform_volume(volume.astype(jnp.float32), affine, transform)
    v = jnp.clip(v, 0, None) ** gamma * scale + shift
    if settings.noise_std:
      v = v + settings.noise_std * jax.random.normal(jax.random.fold_in(k_noise, level), v.shape)
    moved.append(v)
  moved_target = geometry.apply_affine(transform, target_mm)
  return moved, moved_target


def augment_batch(batch: dict, key: jax.Array, *, settings: AugmentSettings) -> dict:
  """A collated batch (volumes S x (B, X, Y, Z), affines S x (B, 4, 4), target_mm (B, K, 3)) with every
  case augmented by its own key (``fold_in(key, b)``); affines unchanged."""
  size = batch["target_mm"].shape[0]
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(size))
  volumes, target = jax.vmap(lambda v, a, t, k: augment_case(v, a, t, k, settings))(
      list(batch["volumes"]), list(batch["affines"]), batch["target_mm"], keys)
  return {**batch, "volumes": volumes, "target_mm": target}
