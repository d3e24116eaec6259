"""Random variation one template does not show: anatomy, contrast and field of view (NumPy, host side).

Every case of a data set built from one template shares its anatomy, its contrast and a whole-head field
of view, so a model trained on them learns where the template puts a landmark, not how to read the image.
These draws, applied by `augment_host.augment` when their settings are on, break each of the three:

- anatomy: a smooth random displacement field (RAS mm) on a coarse grid of nodes `spacing_mm` apart
  (the wavelength of the deformation, drawn per case), trilinear in between, with an amplitude kept
  below 1/6 of the node spacing so that x -> x + d(x) never folds (its Jacobian stays positive) and the
  landmarks' fixed-point inversion converges; and a per-axis scale (brain size and shape);
- contrast: a random lookup table of the normalised intensity (knots on [0, 1], values drawn anew, not
  monotone), which gives each tissue band its own random brightness and can reorder them (T1w's
  dark CSF / bright white matter becomes T2w's bright CSF / dark white matter), in the spirit of
  SynthSeg's per-tissue intensities; a smooth multiplicative bias field; blur; thick slices (a box
  average along one axis);
- field of view: a random box around the grid's centre (a slab along one axis, or a partial volume)
  outside which the image is zero, as a partial acquisition preprocessed onto our grid looks; landmarks
  outside it are absent.

Frames: volumes are voxel-indexed (X, Y, Z) with voxel->RAS `affine`; fields and boxes are in RAS mm.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage

from locnet_jax import geometry

# amplitude / node spacing below which a trilinear random field cannot fold space: each entry of the
# displacement's Jacobian is at most 2a/spacing, so the 3 x 3 gradient has norm < 1 (det(I + grad) > 0)
# when 3 * 2a/spacing < 1. (0.4, used before, folded space at random points: measured in the test.)
FOLD_FREE = 1.0 / 6.0


@dataclasses.dataclass(frozen=True)
class DisplacementField:
  """A displacement (RAS mm) on a regular grid of nodes over a world box, trilinear in between and
  constant (the edge nodes' values) outside."""

  lower_mm: np.ndarray  # (3,) the first node
  spacing_mm: np.ndarray  # (3,) between nodes
  values_mm: np.ndarray  # (3, NX, NY, NZ)

  def __call__(self, points_mm: np.ndarray) -> np.ndarray:
    """(N, 3) RAS mm -> (N, C) values (C = 3 for a displacement, mm)."""
    grid = ((np.asarray(points_mm, np.float64) - self.lower_mm) / self.spacing_mm).T
    return np.stack([scipy.ndimage.map_coordinates(v, grid, order=1, mode="nearest") for v in self.values_mm], -1)

  def on_grid(self, affine: np.ndarray, shape, rows: slice = slice(None)) -> np.ndarray:
    """The field at the voxel centres of a grid (voxel->RAS `affine`, `shape`), (X', Y, Z, C) for the first
    axis' `rows`: the values `self` gives at `voxel_centres_mm`. Why a method: on a grid whose voxel axes are
    the world's (a diagonal affine, as every pyramid level's) trilinear interpolation is separable, three
    small matrix products instead of an interpolation per voxel (the warp's main cost on the host); other
    grids go through `__call__`."""
    affine = np.asarray(affine, np.float64)
    axes = [np.arange(shape[0])[rows], np.arange(shape[1]), np.arange(shape[2])]
    if np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))) == 0:
      weights = [_linear_weights((affine[a, a] * axes[a] + affine[a, 3] - self.lower_mm[a]) / self.spacing_mm[a],
                                 self.values_mm.shape[a + 1]) for a in range(3)]
      return np.einsum("cijk,xi,yj,zk->xyzc", self.values_mm, *weights, optimize=True)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    return self(geometry.vox_to_mm(grid.reshape(-1, 3).astype(np.float64), affine)).reshape(*grid.shape[:3], -1)


def _linear_weights(coords: np.ndarray, count: int) -> np.ndarray:
  """(L,) positions in node units -> (L, count) linear interpolation weights, clamped to the first and last
  node (SciPy's mode="nearest")."""
  c = np.clip(np.asarray(coords, np.float64), 0.0, count - 1)
  lower = np.minimum(np.floor(c).astype(int), count - 2)
  frac = c - lower
  weights = np.zeros((len(c), count))
  weights[np.arange(len(c)), lower] = 1.0 - frac
  weights[np.arange(len(c)), lower + 1] += frac
  return weights


def random_displacement(rng: np.random.Generator, *, lower_mm, upper_mm, spacing_mm: float,
                        max_mm: float) -> DisplacementField:
  """A field over the box [lower_mm, upper_mm] with nodes ~`spacing_mm` apart, each component uniform in
  [-a, a] with a = min(max_mm, FOLD_FREE * spacing_mm)."""
  lower, upper = np.asarray(lower_mm, np.float64), np.asarray(upper_mm, np.float64)
  nodes = np.maximum(np.ceil((upper - lower) / spacing_mm).astype(int) + 1, 2)
  step = (upper - lower) / (nodes - 1)
  amplitude = min(max_mm, FOLD_FREE * float(step.min()))
  return DisplacementField(lower, step, rng.uniform(-amplitude, amplitude, (3, *nodes)))


def grid_box_mm(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
  """(lower, upper) RAS mm corners of the box around every voxel centre of a grid."""
  corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1).T
  world = geometry.vox_to_mm(corners.astype(np.float64), affine)
  return world.min(0), world.max(0)


def random_lut(rng: np.random.Generator, *, knots: int) -> np.ndarray:
  """(knots,) output intensities at `knots` evenly spaced inputs on [0, 1]: 0 stays 0 (air is dark in
  every MR contrast), the others uniform on [0, 1], in no particular order."""
  values = rng.uniform(0.0, 1.0, knots)
  values[0] = 0.0
  return values


def apply_lut(volume: np.ndarray, lut: np.ndarray) -> np.ndarray:
  """Piecewise-linear intensity map through `lut` (values at linspace(0, 1, len(lut))); inputs are clipped
  to [0, 1] first."""
  return np.interp(np.clip(volume, 0.0, 1.0), np.linspace(0.0, 1.0, len(lut)), lut).astype(np.float32)


def smooth_log_field(rng: np.random.Generator, *, lower_mm, upper_mm, max_log: float,
                     nodes: int = 4) -> DisplacementField:
  """A smooth random scalar field on a box (`nodes`^3 nodes, trilinear, one channel): a bias field's logarithm."""
  lower, upper = np.asarray(lower_mm, np.float64), np.asarray(upper_mm, np.float64)
  values = rng.uniform(-max_log, max_log, (1, nodes, nodes, nodes))
  return DisplacementField(lower, (upper - lower) / (nodes - 1), values)


def voxel_centres_mm(affine: np.ndarray, shape) -> np.ndarray:
  """(X*Y*Z, 3) RAS mm of every voxel centre, in C order."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
  return geometry.vox_to_mm(grid.astype(np.float64), affine)


def blur(volume: np.ndarray, affine: np.ndarray, sigma_mm: float) -> np.ndarray:
  """Gaussian blur of std `sigma_mm` (world mm, converted per voxel axis)."""
  if sigma_mm <= 0:
    return volume
  sigma_vox = sigma_mm / geometry.voxel_spacing_mm(affine)
  return scipy.ndimage.gaussian_filter(volume, sigma_vox, mode="nearest").astype(np.float32)


def thick_slices(volume: np.ndarray, affine: np.ndarray, *, axis: int, thickness_mm: float) -> np.ndarray:
  """What an acquisition with `thickness_mm` slices along voxel axis `axis` sees: a box average of that
  width along the axis (partial volume), sampled back on the same grid."""
  width = int(round(thickness_mm / geometry.voxel_spacing_mm(affine)[axis]))
  if width <= 1:
    return volume
  return scipy.ndimage.uniform_filter1d(volume, width, axis=axis, mode="nearest").astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FieldOfView:
  """A world-axis-aligned box (RAS mm): the part of space an acquisition covered."""

  lower_mm: np.ndarray  # (3,)
  upper_mm: np.ndarray  # (3,)

  def contains(self, points_mm: np.ndarray) -> np.ndarray:
    """(..., 3) RAS mm -> (...,) bool; NaN points are outside."""
    p = np.asarray(points_mm, np.float64)
    return np.all((p >= self.lower_mm) & (p <= self.upper_mm), axis=-1)

  def mask(self, affine: np.ndarray, shape) -> np.ndarray:
    """(X, Y, Z) bool: the voxel centres inside the box."""
    return self.contains(voxel_centres_mm(affine, shape)).reshape(shape)


def random_field_of_view(rng: np.random.Generator, *, center_mm, extent_mm, min_mm: float,
                         slab_probability: float) -> FieldOfView:
  """A box around `center_mm` (+- a tenth of `extent_mm` (3,), the grid's size): with
  `slab_probability` a slab, thin (`min_mm` to half the extent) along one random world axis and whole
  along the others; else a partial volume, each side `min_mm` to the whole extent."""
  extent = np.asarray(extent_mm, np.float64)
  center = np.asarray(center_mm, np.float64) + rng.uniform(-0.1, 0.1, 3) * extent
  if rng.uniform() < slab_probability:
    size = extent * 2.0  # whole along the other axes
    axis = rng.integers(3)
    size[axis] = rng.uniform(min_mm, max(min_mm, 0.5 * extent[axis]))
  else:
    size = rng.uniform(np.minimum(min_mm, extent), extent)
  return FieldOfView(center - size / 2, center + size / 2)
