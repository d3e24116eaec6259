"""Synthetic landmark cases made in memory: the built-in demo data and fast test data.

Each case is a world-aligned pyramid (one isotropic grid per spacing, all centred at the world origin)
of an image holding one blob per landmark: a broad Gaussian (visible at the coarsest scale) plus a
sharp core (for the finest), with amplitude ``(k + 1) / K`` so the landmarks can be told apart, over a
smooth random background and noise. The image is evaluated analytically on every grid, so the levels
agree exactly and the true landmark positions are known in RAS mm.
"""

from __future__ import annotations

import numpy as np

from locnet_jax.data.loader import Example
from locnet_jax.data.preprocess import Pyramid


def pyramid_affines(*, spacings_mm, finest_size: int) -> list[np.ndarray]:
  """Voxel->RAS affines (4, 4) of world-aligned isotropic grids sharing one field of view centred at 0."""
  fov_mm = finest_size * spacings_mm[-1]
  affines = []
  for spacing in spacings_mm:
    affine = np.eye(4)
    affine[:3, :3] *= spacing
    affine[:3, 3] = -fov_mm / 2 + spacing / 2
    affines.append(affine)
  return affines


def pyramid_shapes(*, spacings_mm, finest_size: int) -> list[tuple[int, int, int]]:
  fov_mm = finest_size * spacings_mm[-1]
  return [(int(round(fov_mm / s)),) * 3 for s in spacings_mm]


def _separable_gaussian(axes_mm, center_mm, sigma_mm):
  g = [np.exp(-0.5 * ((a - c) / sigma_mm) ** 2) for a, c in zip(axes_mm, center_mm)]
  return g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]


def make_case(rng: np.random.Generator, *, spacings_mm, finest_size: int, num_landmarks: int,
              broad_sigma_mm: float | None = None, noise: float = 0.05, case_id: str = "synthetic") -> Example:
  """One synthetic case as a `loader.Example`: its pyramid (S levels) and landmarks (K, 3) RAS mm.

  Landmarks are uniform in the central half of the field of view. `broad_sigma_mm` defaults to the
  coarsest spacing; the sharp core has a std of twice the finest spacing.
  """
  fov_mm = finest_size * spacings_mm[-1]
  broad = broad_sigma_mm or spacings_mm[0]
  core = 2 * spacings_mm[-1]
  target_mm = rng.uniform(-fov_mm / 4, fov_mm / 4, size=(num_landmarks, 3))
  background = [(rng.uniform(-fov_mm / 2, fov_mm / 2, 3), rng.uniform(0.1, 0.3), rng.uniform(0.15, 0.3) * fov_mm)
                for _ in range(3)]
  volumes = []
  affines = pyramid_affines(spacings_mm=spacings_mm, finest_size=finest_size)
  for affine, shape in zip(affines, pyramid_shapes(spacings_mm=spacings_mm, finest_size=finest_size)):
    axes_mm = [affine[a, 3] + affine[a, a] * np.arange(n) for a, n in enumerate(shape)]
    image = np.zeros(shape)
    for center, amplitude, sigma in background:
      image += amplitude * _separable_gaussian(axes_mm, center, sigma)
    for k, center in enumerate(target_mm):
      amplitude = (k + 1) / num_landmarks
      image += amplitude * (_separable_gaussian(axes_mm, center, broad) + _separable_gaussian(axes_mm, center, core))
    image += noise * rng.standard_normal(shape)
    volumes.append(image.astype(np.float32))
  return Example(case_id, Pyramid(tuple(volumes), tuple(affines)), target_mm)


def make_cases(seed: int, count: int, **kwargs) -> list[Example]:
  """`count` cases, case i drawn from ``np.random.default_rng((seed, i))``."""
  return [make_case(np.random.default_rng((seed, i)), case_id=f"synthetic{i:03d}", **kwargs) for i in range(count)]
