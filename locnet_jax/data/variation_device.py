"""The random variation of `variation` (anatomy, contrast, field of view) in JAX, jittable, for `augment_device`.

The same distributions as the host's draws, values from a JAX key, every shape static: a displacement's
node grid is allocated for the smallest node spacing over a box of up to MAX_BOX_MM (the grid's box is a
traced value), and blur and thick slices are (n, n) matrices along each voxel axis, exact with "nearest"
edges for any traced width. Frames: volumes (X, Y, Z) voxel-indexed with voxel->RAS `affine` (4, 4);
points, fields and boxes RAS mm.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from locnet_jax.data.variation import FOLD_FREE

MAX_BOX_MM = 512.0  # a displacement's node grid covers boxes this wide (beyond: its last nodes' values)
MAX_NODES = 129  # per axis: a node spacing of 4 mm at least over MAX_BOX_MM
HIGHEST = jax.lax.Precision.HIGHEST  # the axis filters' matmuls in float32 (not TF32) on GPUs


class NodeField(NamedTuple):
  """Values (C, NX, NY, NZ) on nodes `step_mm` (3,) apart from `lower_mm` (3,), of which the first
  `nodes` (3,) are used: trilinear in between, the last used nodes' values outside (as
  `variation.DisplacementField`)."""

  lower_mm: jax.Array
  step_mm: jax.Array
  nodes: jax.Array  # (3,) float
  values: jax.Array

  def __call__(self, points_mm: jax.Array) -> jax.Array:
    """(..., 3) RAS mm -> (..., C): the 8 surrounding nodes' values (all channels, one gather), weighted."""
    shape = self.values.shape[1:]
    grid = jnp.clip((points_mm - self.lower_mm) / self.step_mm, 0.0, self.nodes - 1)
    base = jnp.clip(jnp.floor(grid), 0, jnp.asarray(shape) - 2)  # 2 nodes per axis at least
    frac, base = grid - base, base.astype(jnp.int32)
    corners = np.array(list(itertools.product((0, 1), repeat=3)))  # (8, 3)
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    index = (base @ strides)[..., None] + corners @ strides  # (..., 8) into the flat (NX * NY * NZ, C) table
    table = jnp.moveaxis(self.values, 0, -1).reshape(-1, self.values.shape[0])
    weights = jnp.prod(jnp.where(corners.astype(bool), frac[..., None, :], 1 - frac[..., None, :]), axis=-1)
    return jnp.einsum("...k,...kc->...c", weights, table.at[index].get(mode="clip"))  # clip: NaN points


def grid_box_mm(affine: jax.Array, shape) -> tuple[jax.Array, jax.Array]:
  """(lower, upper) (3,) RAS mm corners of the box around every voxel centre of a grid of `shape`."""
  corners = jnp.stack(jnp.meshgrid(*[jnp.array([0.0, n - 1.0]) for n in shape], indexing="ij"), -1).reshape(-1, 3)
  world = corners @ affine[:3, :3].T + affine[:3, 3]
  return world.min(0), world.max(0)


def random_displacement(key: jax.Array, *, lower_mm: jax.Array, upper_mm: jax.Array,
                        spacing_range_mm: tuple[float, float], max_mm: float) -> NodeField:
  """`variation.random_displacement` with its node spacing drawn U(spacing_range_mm): nodes ~spacing apart
  over the box, each component uniform in [-a, a], a = min(max_mm, FOLD_FREE * node step)."""
  nodes_max = math.ceil(MAX_BOX_MM / spacing_range_mm[0]) + 1
  if nodes_max > MAX_NODES:
    raise ValueError(f"deform_spacing_mm starts at {spacing_range_mm[0]} mm; the device augmentation needs "
                     f"{MAX_BOX_MM / (MAX_NODES - 1)} mm at least")
  u = jax.random.uniform(key, (1 + 3 * nodes_max ** 3,))  # one flat draw: compiles several times faster
  spacing = spacing_range_mm[0] + (spacing_range_mm[1] - spacing_range_mm[0]) * u[0]
  extent = upper_mm - lower_mm
  nodes = jnp.maximum(jnp.ceil(extent / spacing) + 1, 2.0)
  step = extent / (nodes - 1)
  amplitude = jnp.minimum(max_mm, FOLD_FREE * step.min())
  values = (2 * u[1:] - 1).reshape(3, nodes_max, nodes_max, nodes_max) * amplitude
  return NodeField(lower_mm, step, jnp.minimum(nodes, nodes_max), values)


def smooth_log_field(key: jax.Array, *, lower_mm: jax.Array, upper_mm: jax.Array, max_log: float,
                     nodes: int = 4) -> NodeField:
  """`variation.smooth_log_field`: `nodes`^3 values U(-max_log, max_log) over the box, one channel."""
  values = jax.random.uniform(key, (nodes ** 3,), minval=-max_log, maxval=max_log).reshape(1, nodes, nodes, nodes)
  return NodeField(lower_mm, (upper_mm - lower_mm) / (nodes - 1), jnp.full((3,), float(nodes)), values)


def move_points(points_mm: jax.Array, *, transform: jax.Array, field: NodeField, iterations: int = 20) -> jax.Array:
  """`augment_host.move_points`: where points (K, 3) RAS mm land when the moved image at p is the old one at
  inv(transform)(p + field(p)), by the fixed-point iteration p <- transform(point) - field(p). NaN rows stay NaN."""
  moved = points_mm @ transform[:3, :3].T + transform[:3, 3]
  return jax.lax.fori_loop(0, iterations, lambda _, p: moved - field(p), moved)


def field_on_grid(field: NodeField, affine: jax.Array, shape, *, max_points: int = 1 << 21) -> jax.Array:
  """(X, Y, Z) the field's channel 0 at every voxel centre, in slabs of x-slices of at most `max_points`."""
  ny, nz = shape[1:]
  yz = jnp.stack(jnp.meshgrid(jnp.arange(ny, dtype=jnp.float32), jnp.arange(nz, dtype=jnp.float32),
                              indexing="ij"), -1)

  def one_slice(x):
    vox = jnp.concatenate([jnp.full((ny, nz, 1), x, jnp.float32), yz], -1)
    return field(vox @ affine[:3, :3].T + affine[:3, 3])[..., 0]

  slab = max(1, min(shape[0], max_points // (ny * nz)))
  return jax.lax.map(one_slice, jnp.arange(shape[0], dtype=jnp.float32), batch_size=slab)


def apply_lut(volume: jax.Array, lut: jax.Array) -> jax.Array:
  """Piecewise-linear intensity map through `lut` (values at linspace(0, 1, len(lut))) of the volume
  clipped to [0, 1]."""
  return jnp.interp(jnp.clip(volume, 0.0, 1.0), jnp.linspace(0.0, 1.0, lut.shape[0]), lut)


def _offsets(n: int) -> jax.Array:
  """(4n + 1,) the offsets -2n .. 2n of a 1-D filter on an axis of n voxels (the first and last stand for
  every offset beyond them: all clip to the same edge voxel)."""
  return jnp.arange(-2 * n, 2 * n + 1, dtype=jnp.float32)


def _edge_matrix(weights: jax.Array, n: int) -> jax.Array:
  """(n, n) M of a 1-D filter with "nearest" edges, out[i] = sum_k w(k) in[clip(i + k, 0, n - 1)] = (M @ in)[i],
  from the weights (4n + 1,) at `_offsets(n)`."""
  i, k = np.arange(n)[:, None], _offsets(n)
  j = np.arange(n)[None, :]
  left = jnp.sum(jnp.where(k < -i, weights, 0.0), axis=1, keepdims=True)  # offsets clipped to column 0
  right = jnp.sum(jnp.where(k > n - 1 - i, weights, 0.0), axis=1, keepdims=True)  # ... to column n - 1
  return weights[j - i + 2 * n] + jnp.where(j == 0, left, 0.0) + jnp.where(j == n - 1, right, 0.0)


def gaussian_matrix(n: int, sigma_vox: jax.Array) -> jax.Array:
  """(n, n) Gaussian blur of std `sigma_vox`, as scipy's gaussian_filter1d (truncated at radius
  int(4 sigma + 0.5), normalised, mode "nearest"; radii beyond 2n are cut there); the identity for sigma 0."""
  sigma = jnp.maximum(sigma_vox, 1e-6)
  k = _offsets(n)
  weights = jnp.where(jnp.abs(k) <= jnp.floor(4.0 * sigma + 0.5), jnp.exp(-0.5 * (k / sigma) ** 2), 0.0)
  return _edge_matrix(weights / weights.sum(), n)


def box_matrix(n: int, width: jax.Array) -> jax.Array:
  """(n, n) box average of `width` voxels (integer-valued; <= 1: the identity), as scipy's uniform_filter1d
  (offsets -(width // 2) .. width - width // 2 - 1, mode "nearest")."""
  width = jnp.maximum(width, 1.0)
  first = -jnp.floor(width / 2)
  k = _offsets(n)
  lower = jnp.where(k == k[0], -jnp.inf, k)  # the end offsets count the box's offsets beyond them too
  upper = jnp.where(k == k[-1], jnp.inf, k)
  count = jnp.clip(jnp.minimum(upper, first + width - 1) - jnp.maximum(lower, first) + 1, 0.0, None)
  return _edge_matrix(count / width, n)


def filter_axes(volume: jax.Array, matrices) -> jax.Array:
  """(X, Y, Z) volume filtered along each voxel axis a by `matrices[a]` (n_a, n_a): a matmul per axis, n_a
  multiply-adds per voxel (any filter width, traced)."""
  volume = jnp.einsum("ai,ijk->ajk", matrices[0], volume, precision=HIGHEST)
  volume = jnp.einsum("bj,ijk->ibk", matrices[1], volume, precision=HIGHEST)
  return jnp.einsum("ck,ijk->ijc", matrices[2], volume, precision=HIGHEST)


def blur_and_thick_slices(volume: jax.Array, affine: jax.Array, *, blur_mm: jax.Array | None = None,
                          thick: tuple | None = None) -> jax.Array:
  """`variation.blur` (std `blur_mm`, converted per voxel axis), then `variation.thick_slices` where
  `thick` = (on, axis, thickness_mm) (traced) says so: a box of round(thickness / spacing) voxels along the axis."""
  spacing = jnp.linalg.norm(affine[:3, :3], axis=0)
  matrices = []
  for a, n in enumerate(volume.shape):
    m = jnp.eye(n) if blur_mm is None else gaussian_matrix(n, blur_mm / spacing[a])
    if thick is not None:
      on, axis, thickness_mm = thick
      box = box_matrix(n, jnp.round(thickness_mm / spacing[a]))
      m = jnp.where(on & (axis == a), jnp.matmul(box, m, precision=HIGHEST), m)
    matrices.append(m)
  return filter_axes(volume, matrices)


def random_field_of_view(u: jax.Array, *, center_mm: jax.Array, extent_mm: jax.Array, min_mm: float,
                         slab_probability: float) -> tuple[jax.Array, jax.Array]:
  """`variation.random_field_of_view` from 9 draws `u` U(0, 1): (lower, upper) (3,) RAS mm of a box around
  `center_mm` +- a tenth of `extent_mm`; with `slab_probability` a slab (min_mm to half the extent along one
  random axis, twice the extent along the others), else each side U(min(min_mm, extent), extent)."""
  center = center_mm + (0.2 * u[:3] - 0.1) * extent_mm
  axis = jnp.minimum(jnp.floor(3 * u[3]), 2)
  thin = min_mm + (jnp.maximum(min_mm, 0.5 * extent_mm[axis.astype(jnp.int32)]) - min_mm) * u[4]
  slab = jnp.where(jnp.arange(3) == axis, thin, 2.0 * extent_mm)
  partial = jnp.minimum(min_mm, extent_mm) + (extent_mm - jnp.minimum(min_mm, extent_mm)) * u[5:8]
  size = jnp.where(u[8] < slab_probability, slab, partial)
  return center - size / 2, center + size / 2


def inside(points_mm: jax.Array, lower_mm: jax.Array, upper_mm: jax.Array) -> jax.Array:
  """(..., 3) RAS mm -> (...,) bool: inside the box (NaN points are outside)."""
  return jnp.all((points_mm >= lower_mm) & (points_mm <= upper_mm), axis=-1)


def box_mask(affine: jax.Array, shape, lower_mm: jax.Array, upper_mm: jax.Array) -> jax.Array:
  """(X, Y, Z) bool: the voxel centres inside the box."""
  x, y, z = (jnp.arange(n, dtype=jnp.float32) for n in shape)
  world = [affine[c, 0] * x[:, None, None] + affine[c, 1] * y[None, :, None] + affine[c, 2] * z[None, None, :]
           + affine[c, 3] for c in range(3)]
  return jnp.all(jnp.stack([(w >= lower_mm[c]) & (w <= upper_mm[c]) for c, w in enumerate(world)]), axis=0)
