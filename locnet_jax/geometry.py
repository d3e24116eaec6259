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


def depth_in_grid_mm(points_mm, affine, shape):
  """How deep each point lies inside a voxel grid's field of view, (...) mm: positive inside, negative outside.

  The field of view is the box the grid's voxels cover, from the outer face of voxel 0 to that of voxel
  ``n - 1`` along each voxel axis (voxel centres at ``0 .. n - 1``, so half a voxel beyond them). Per axis
  the depth is the distance (mm along that axis) to the nearer face; the result is the smallest of the three:
  inside, the distance to the nearest face; outside, minus the largest overshoot along one axis (a lower
  bound of the Euclidean distance outside, exact when one axis is crossed).

  Args:
    points_mm: (..., 3) RAS mm.
    affine: (4, 4) voxel->RAS of the grid; shape: its (3,) voxel counts.
  """
  xp = _xp(points_mm, affine)
  vox = mm_to_vox(points_mm, affine)
  n = xp.asarray(shape, vox.dtype)
  depth_vox = xp.minimum(vox + 0.5, n - 0.5 - vox)
  return xp.min(depth_vox * voxel_spacing_mm(affine), axis=-1)
