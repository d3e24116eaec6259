"""Coordinate frames: voxel indices (`_vox`) and world millimetres (`_mm`, RAS+).

`affine` is always the 4x4 matrix that maps a voxel index (centre of voxel ``i`` at ``i``) to RAS mm,
exactly as nibabel's ``img.affine``; a stack ``(..., 4, 4)`` broadcasts against points ``(..., 3)``. Every function works on NumPy
arrays in float64 (host-side, for I/O) and on JAX arrays (inside ``jit``), returning the same kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
  """NumPy for host arrays, jax.numpy as soon as one input is a JAX array or tracer."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def apply_affine(affine, points):
  """Applies homogeneous affines (..., 4, 4) to `points` (..., 3), broadcasting the leading axes."""
  xp = _xp(affine, points)
  affine = xp.asarray(affine)
  points = xp.asarray(points)
  return xp.einsum("...ij,...j->...i", affine[..., :3, :3], points) + affine[..., :3, 3]


def vox_to_mm(points_vox, affine):
  """Voxel indices (..., 3) -> RAS mm (..., 3) through the voxel->RAS `affine` (4, 4)."""
  return apply_affine(affine, points_vox)


def mm_to_vox(points_mm, affine):
  """RAS mm (..., 3) -> voxel indices (..., 3), the inverse of `vox_to_mm` for the same `affine`."""
  xp = _xp(affine, points_mm)
  return apply_affine(xp.linalg.inv(xp.asarray(affine)), points_mm)


def voxel_spacing_mm(affine):
  """Voxel size along each voxel axis, (..., 3) mm: the column norms of ``affine[..., :3, :3]``."""
  xp = _xp(affine)
  return xp.linalg.norm(xp.asarray(affine)[..., :3, :3], axis=-2)


def lps_to_ras(points):
  """LPS (ITK, DICOM, Slicer's default file frame) <-> RAS: negate x and y. Its own inverse."""
  xp = _xp(points)
  return xp.asarray(points) * xp.asarray([-1.0, -1.0, 1.0])


ras_to_lps = lps_to_ras
