"""Training-time augmentation of a pyramid and its landmarks, together, deterministic from a NumPy RNG.

A random world transform T (rotation about the grid centre, isotropic scale, translation), optionally
followed by a smooth elastic displacement d, moves the image content: every level is resampled so that
the new image at world point p is the old one at inv(T)(p + d(p)), on the same grid (same affines), and
the landmarks move to where that map sends them (T(l) without d). Intensity changes (gamma,
scale, shift, noise) are drawn once per case and applied to every level alike (the noise per level).
The caller seeds the RNG with ``(seed, epoch, case_index)``, so a resumed run replays exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage
from scipy.spatial.transform import Rotation

from locnet_jax import geometry
from locnet_jax.data import preprocess
from locnet_jax.data.preprocess import Pyramid


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  max_rotation_deg: float = 10.0  # uniform per axis
  max_scale: float = 0.05  # isotropic factor in [1 - s, 1 + s]
  max_translation_mm: float = 10.0  # uniform per axis
  max_gamma: float = 0.2  # intensity ** exp(U(-g, g)), on [0, 1]-normalised images
  max_intensity_scale: float = 0.1  # * U(1 - s, 1 + s)
  max_intensity_shift: float = 0.05  # + U(-s, s)
  noise_std: float = 0.01  # Gaussian noise std
  elastic_mm: float = 0.0  # > 0: a smooth random displacement of up to this many mm (slower)


def random_transform(rng: np.random.Generator, settings: AugmentSettings, center_mm) -> np.ndarray:
  """World->world (4, 4): rotate and scale about `center_mm`, then translate."""
  linear = Rotation.from_euler("xyz", rng.uniform(-1, 1, 3) * settings.max_rotation_deg, degrees=True).as_matrix()
  linear = linear * rng.uniform(1 - settings.max_scale, 1 + settings.max_scale)
  center = np.asarray(center_mm, np.float64)
  transform = np.eye(4)
  transform[:3, :3] = linear
  transform[:3, 3] = center - linear @ center + rng.uniform(-1, 1, 3) * settings.max_translation_mm
  return transform


class ElasticField:
  """A smooth random displacement field (RAS mm) on a coarse grid over a world box, trilinear in between."""

  def __init__(self, rng: np.random.Generator, *, lower_mm, upper_mm, max_mm: float = 3.0, nodes: int = 5):
    self.lower = np.asarray(lower_mm, np.float64)
    self.step = (np.asarray(upper_mm, np.float64) - self.lower) / (nodes - 1)
    self.values = rng.uniform(-max_mm, max_mm, (3, nodes, nodes, nodes))

  def __call__(self, points_mm: np.ndarray) -> np.ndarray:
    grid = ((points_mm - self.lower) / self.step).T
    return np.stack([scipy.ndimage.map_coordinates(v, grid, order=1, mode="nearest") for v in self.values], -1)

  @classmethod
  def over_grid(cls, rng, affine, shape, *, max_mm: float) -> "ElasticField":
    corners = geometry.vox_to_mm(np.array([[0, 0, 0], np.asarray(shape) - 1], np.float64), affine)
    return cls(rng, lower_mm=corners.min(0), upper_mm=corners.max(0), max_mm=max_mm)


def source_points(transform: np.ndarray, elastic=None):
  """The world map of a warp: the moved image at p is the original at inv(transform)(p + elastic(p))."""
  inverse = np.linalg.inv(transform)
  if elastic is None:
    return lambda p: geometry.apply_affine(inverse, p)
  return lambda p: geometry.apply_affine(inverse, p + elastic(p))


def move_points(points_mm: np.ndarray, *, transform: np.ndarray, elastic=None, iterations: int = 20) -> np.ndarray:
  """Where points (K, 3) land under the warp of `source_points`: solves inv(transform)(p + elastic(p)) =
  point by fixed-point iteration (the field is small and smooth). NaN rows stay NaN."""
  moved = geometry.apply_affine(transform, points_mm)
  if elastic is None:
    return moved
  ok = np.all(np.isfinite(moved), axis=-1)
  p = moved.copy()
  for _ in range(iterations):
    p[ok] = moved[ok] - elastic(p[ok])
  return p


def transform_volume(volume: np.ndarray, affine: np.ndarray, transform: np.ndarray) -> np.ndarray:
  """The image moved by the world transform `transform`, on its own grid (0 outside the old image)."""
  vox_map = np.linalg.inv(affine) @ np.linalg.inv(transform) @ affine  # new voxel -> old voxel
  return scipy.ndimage.affine_transform(np.asarray(volume, np.float32), vox_map[:3, :3], offset=vox_map[:3, 3],
                                        order=1, mode="constant", cval=0.0, prefilter=False)


def augment(pyramid: Pyramid, target_mm: np.ndarray, rng: np.random.Generator,
            settings: AugmentSettings) -> tuple[Pyramid, np.ndarray, np.ndarray]:
  """Returns (augmented pyramid, moved landmarks (K, 3) RAS mm, the world transform (4, 4))."""
  fine = pyramid.affines[-1]
  center = geometry.vox_to_mm((np.asarray(pyramid.volumes[-1].shape, np.float64) - 1) / 2, fine)
  transform = random_transform(rng, settings, center)
  gamma = np.exp(rng.uniform(-settings.max_gamma, settings.max_gamma))
  scale = rng.uniform(1 - settings.max_intensity_scale, 1 + settings.max_intensity_scale)
  shift = rng.uniform(-settings.max_intensity_shift, settings.max_intensity_shift)
  field = (ElasticField.over_grid(rng, fine, pyramid.volumes[-1].shape, max_mm=settings.elastic_mm)
           if settings.elastic_mm > 0 else None)
  volumes = []
  for volume, affine in zip(pyramid.volumes, pyramid.affines):
    if field is None:
      moved = transform_volume(volume, affine, transform)
    else:
      moved = preprocess.resample(volume, affine, target_affine=affine, target_shape=volume.shape,
                                  world_map=source_points(transform, field))
    moved = np.clip(moved, 0, None) ** gamma * scale + shift
    if settings.noise_std:
      moved = moved + rng.normal(0.0, settings.noise_std, moved.shape)
    volumes.append(moved.astype(np.float32))
  moved_target = move_points(target_mm, transform=transform, elastic=field)
  return Pyramid(tuple(volumes), pyramid.affines), moved_target, transform
