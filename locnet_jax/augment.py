"""Training-time augmentation of a pyramid and its landmarks, together, deterministic from a NumPy RNG.

A random world transform T (rotation about the grid centre, isotropic scale, translation) moves the
image content: every level is resampled so that the new image at world point p is the old one at
inv(T)(p), on the same grid (same affines), and the landmarks move to T(l). Intensity changes (gamma,
scale, shift, noise) are drawn once per case and applied to every level alike (the noise per level).
The caller seeds the RNG with ``(seed, epoch, case_index)``, so a resumed run replays exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage
from scipy.spatial.transform import Rotation

from locnet_jax import geometry
from locnet_jax.preprocess import Pyramid


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  max_rotation_deg: float = 10.0  # uniform per axis
  max_scale: float = 0.05  # isotropic factor in [1 - s, 1 + s]
  max_translation_mm: float = 10.0  # uniform per axis
  max_gamma: float = 0.2  # intensity ** exp(U(-g, g)), on [0, 1]-normalised images
  max_intensity_scale: float = 0.1  # * U(1 - s, 1 + s)
  max_intensity_shift: float = 0.05  # + U(-s, s)
  noise_std: float = 0.01  # Gaussian noise std


def random_transform(rng: np.random.Generator, settings: AugmentSettings, center_mm) -> np.ndarray:
  """World->world (4, 4): rotate and scale about `center_mm`, then translate."""
  linear = Rotation.from_euler("xyz", rng.uniform(-1, 1, 3) * settings.max_rotation_deg, degrees=True).as_matrix()
  linear = linear * rng.uniform(1 - settings.max_scale, 1 + settings.max_scale)
  center = np.asarray(center_mm, np.float64)
  transform = np.eye(4)
  transform[:3, :3] = linear
  transform[:3, 3] = center - linear @ center + rng.uniform(-1, 1, 3) * settings.max_translation_mm
  return transform


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
  volumes = []
  for volume, affine in zip(pyramid.volumes, pyramid.affines):
    moved = transform_volume(volume, affine, transform)
    moved = np.clip(moved, 0, None) ** gamma * scale + shift
    if settings.noise_std:
      moved = moved + rng.normal(0.0, settings.noise_std, moved.shape)
    volumes.append(moved.astype(np.float32))
  return Pyramid(tuple(volumes), pyramid.affines), geometry.apply_affine(transform, target_mm), transform
