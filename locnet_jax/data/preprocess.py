"""From a loaded volume to the model's input: intensity normalisation and the multi-scale pyramid.

Paper, section 3: every image is resampled once onto an isotropic, world-aligned grid at the finest
spacing (448^3 at 0.5 mm, a 224 mm field of view centred on the image), and the coarser levels (1, 2,
4 mm) are made from it by anti-aliased 2x down-sampling. Every level knows its own voxel->RAS affine,
so landmarks stay in mm. Levels are ordered coarse to fine, as the model takes them.

Normalisation happens before resampling, so that the space outside the image is 0 after it (air in CT,
background in MR), or `outside_value` (< 0) when the model is to tell the image's edge from dark anatomy: a
partial field of view then shows where the acquisition ends (`split_outside` recovers image and mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.ndimage

from locnet_jax import geometry

INTENSITY_MODES = ("ct", "mr", "none")


@dataclasses.dataclass(frozen=True)
class Pyramid:
  """`volumes[s]` (X_s, Y_s, Z_s) float32 with voxel->RAS `affines[s]` (4, 4), coarse to fine."""

  volumes: tuple[np.ndarray, ...]
  affines: tuple[np.ndarray, ...]


def normalize_intensity(data: np.ndarray, *, mode: str, ct_window_hu=(-1000.0, 1000.0),
                        mr_percentiles=(0.5, 99.5)) -> np.ndarray:
  """Maps intensities to [0, 1]: "ct" clips a Hounsfield window, "mr" scales between two percentiles
  of the image (then clips), "none" leaves the data as they are. Returns float32."""
  data = np.asarray(data, np.float32)
  if mode == "none":
    return data
  if mode == "ct":
    low, high = ct_window_hu
  elif mode == "mr":
    low, high = np.percentile(data, mr_percentiles)
  else:
    raise ValueError(f"intensity mode must be one of {INTENSITY_MODES}, got {mode!r}")
  if not high > low:
    raise ValueError(f"empty intensity range [{low}, {high}] for mode {mode!r}")
  return np.clip((data - low) / (high - low), 0.0, 1.0).astype(np.float32)


def check_spacings(spacings_mm: Sequence[float]) -> None:
  """Pyramid spacings must be listed coarse to fine, each exactly twice the next."""
  s = [float(x) for x in spacings_mm]
  if not s or any(x <= 0 for x in s) or any(not np.isclose(a, 2 * b) for a, b in zip(s, s[1:])):
    raise ValueError(f"spacings_mm must be positive, coarse to fine, each twice the next; got {tuple(s)}")


def grid_affine(*, center_mm, spacing_mm: float, size: int) -> np.ndarray:
  """Voxel->RAS affine of a world-aligned isotropic grid of `size`^3 voxels centred at `center_mm`."""
  affine = np.eye(4)
  affine[:3, :3] *= spacing_mm
  affine[:3, 3] = np.asarray(center_mm, np.float64) - spacing_mm * (size - 1) / 2
  return affine


def image_center_mm(shape, affine) -> np.ndarray:
  """World position (3,) of the centre of an image's voxel grid."""
  return geometry.vox_to_mm((np.asarray(shape[:3], np.float64) - 1) / 2, affine)


def resample(data: np.ndarray, affine: np.ndarray, *, target_affine: np.ndarray, target_shape,
             fill: float = 0.0, world_map=None, slab: int = 32) -> np.ndarray:
  """Trilinear resampling of `data` (voxel->RAS `affine`) onto another grid; `fill` outside the image.

  The target voxel at world point p takes the source's value at p, or at ``world_map(p)`` when given
  (a function of (N, 3) RAS mm points: how augmentation and the AFIDs builder move images). When the
  target is coarser than the source along a source axis, the source is first smoothed with a Gaussian
  (std 0.42 * sqrt(r^2 - 1) voxels for a spacing ratio r) against aliasing. Without `world_map` the map is
  affine and `scipy.ndimage.affine_transform` interpolates (no arrays of points: half the time of the
  general path, the same values); with one, the points are computed in slabs of the target's first axis,
  which bounds memory at 448^3.
  """
  data = np.asarray(data, np.float32)
  source_spacing = geometry.voxel_spacing_mm(affine)
  target_spacing = geometry.voxel_spacing_mm(target_affine).min()
  ratio = target_spacing / source_spacing
  sigma = np.where(ratio > 1, 0.42 * np.sqrt(np.maximum(ratio ** 2 - 1, 0)), 0.0)
  if np.any(sigma > 0.1):
    data = scipy.ndimage.gaussian_filter(data, sigma, mode="nearest")
  world_to_source = np.linalg.inv(affine)
  if world_map is None:  # one affine map, target voxel -> source voxel: SciPy computes the points itself
    to_source = world_to_source @ np.asarray(target_affine, np.float64)
    return scipy.ndimage.affine_transform(data, to_source[:3, :3], offset=to_source[:3, 3],
                                          output_shape=tuple(target_shape), order=1, mode="constant", cval=fill,
                                          prefilter=False)
  out = np.empty(tuple(target_shape), np.float32)
  ny, nz = target_shape[1], target_shape[2]
  grid_yz = np.stack(np.meshgrid(np.arange(ny), np.arange(nz), indexing="ij"), axis=-1).reshape(-1, 2)
  for x0 in range(0, target_shape[0], slab):
    xs = np.arange(x0, min(x0 + slab, target_shape[0]))
    vox = np.concatenate([np.repeat(xs, len(grid_yz))[:, None], np.tile(grid_yz, (len(xs), 1))], axis=1)
    world = geometry.apply_affine(target_affine, vox.astype(np.float64))
    src = geometry.apply_affine(world_to_source, world if world_map is None else world_map(world))
    out[x0:x0 + len(xs)] = scipy.ndimage.map_coordinates(
        data, src.T, order=1, mode="constant", cval=fill, prefilter=False).reshape(len(xs), ny, nz)
  return out


def downsample2(volume: np.ndarray) -> np.ndarray:
  """Anti-aliased 2x down-sampling: the [1, 3, 3, 1] / 8 filter (edge-padded) at every other voxel.

  Voxel i of the result is centred between voxels 2i and 2i+1, so a centred grid stays centred:
  spacing doubles, size halves (every size must be even).
  """
  if any(n % 2 for n in volume.shape):
    raise ValueError(f"downsample2 needs even sizes, got {volume.shape}")
  out = np.asarray(volume, np.float32)
  for axis in range(3):
    p = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
    take = lambda start: np.take(p, np.arange(start, start + out.shape[axis], 2), axis=axis)  # noqa: E731
    out = (take(0) + 3 * take(1) + 3 * take(2) + take(3)) / 8
  return out.astype(np.float32)


def split_outside(volume: np.ndarray, *, outside_value: float) -> tuple[np.ndarray, np.ndarray | None]:
  """A level (X, Y, Z) as (image, 0 outside; inside mask float32 in {0, 1}), the mask None for
  ``outside_value == 0`` (nothing marks the outside). A voxel is inside when more than half of it is image
  (value above ``outside_value / 2``: images are normalised to [0, 1], so the blend of the two at an edge
  decides by its weight)."""
  volume = np.asarray(volume, np.float32)
  if outside_value == 0:
    return volume, None
  inside = volume > outside_value / 2
  return np.where(inside, np.maximum(volume, 0), 0).astype(np.float32), inside.astype(np.float32)


def build_pyramid(data: np.ndarray, affine: np.ndarray, *, spacings_mm: Sequence[float], finest_size: int,
                  center_mm=None, outside_value: float = 0.0) -> Pyramid:
  """The multi-scale input of one (already normalised) image.

  Args:
    data: (X, Y, Z) image; affine: its voxel->RAS (4, 4).
    spacings_mm: level spacings coarse to fine, each twice the next (paper: 4, 2, 1, 0.5).
    finest_size: finest grid size in voxels (paper: 448); must be divisible by 2**(levels - 1).
    center_mm: grid centre (3,) RAS mm; default the centre of the image's voxel grid.
    outside_value: the value of the grid outside the image (0, or < 0 to mark it: module docstring).
  """
  check_spacings(spacings_mm)
  factor = 2 ** (len(spacings_mm) - 1)
  if finest_size % factor:
    raise ValueError(f"finest_size {finest_size} must be divisible by 2**(levels - 1) = {factor}")
  center = image_center_mm(data.shape, affine) if center_mm is None else np.asarray(center_mm, np.float64)
  fine_affine = grid_affine(center_mm=center, spacing_mm=float(spacings_mm[-1]), size=finest_size)
  volumes = [resample(data, affine, target_affine=fine_affine, target_shape=(finest_size,) * 3,
                      fill=outside_value)]
  affines = [fine_affine]
  for spacing in reversed(spacings_mm[:-1]):
    volumes.append(downsample2(volumes[-1]))
    affines.append(grid_affine(center_mm=center, spacing_mm=float(spacing), size=volumes[-1].shape[0]))
  return Pyramid(volumes=tuple(reversed(volumes)), affines=tuple(reversed(affines)))
