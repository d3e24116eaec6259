"""Parameter-free array operations of the Loc-Net, written for one example and batched with `jax.vmap`.

Frames: a `_vox` coordinate of a volume or heatmap puts the centre of voxel ``i`` at ``i`` on each axis.
A patch cut by `crop_patch` has its own `_vox` frame (patch voxel ``j`` at ``j``); `patch_to_volume_vox`
maps it back into the volume's frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.ndimage import map_coordinates

CENTER_OF_MASS_KINDS = ("relu", "softmax")


def _check_volume(name: str, array, ndim: int = 3) -> None:
  if array.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(array.shape)}")
  if any(n < 1 for n in array.shape):
    raise ValueError(f"{name} must not be empty, got shape {tuple(array.shape)}")


def as_shape3(shape) -> tuple[int, int, int]:
  """Normalises an int or a 3-sequence of ints to a 3-tuple, rejecting anything else."""
  if isinstance(shape, (int, np.integer)):
    shape = (int(shape),) * 3
  shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
  if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape):
    raise ValueError(f"shape must be a positive int or 3 positive ints, got {shape!r}")
  return tuple(int(n) for n in shape)


def conv3d_as_2d(x: jax.Array, kernel: jax.Array, *, precision=None) -> jax.Array:
  """3-D convolution (stride 1, "SAME" padding) computed as one 2-D convolution over x-slices.

  x (N, X, Y, Z, C_in), kernel (kx, ky, kz, C_in, C_out) -> (N, X, Y, Z, C_out): the same function as
  `lax.conv_general_dilated` with channels-last 3-D dimension numbers (float rounding aside). The kx
  neighbours along x are stacked on the channel axis, so the volume becomes N*X images of (Y, Z) with
  kx*C_in channels and the kernel a (ky, kz, kx*C_in, C_out) 2-D kernel. XLA:CPU runs 2-D convolutions
  several times faster than 3-D ones (benchmarks/conv_impl.py measures it), and their gradients too.
  """
  if x.ndim != 5 or kernel.ndim != 5 or x.shape[-1] != kernel.shape[3]:
    raise ValueError(f"conv3d_as_2d needs x (N, X, Y, Z, C) and kernel (kx, ky, kz, C, C_out), got "
                     f"{tuple(x.shape)} and {tuple(kernel.shape)}")
  n, sx, sy, sz, c = x.shape
  kx, ky, kz, _, c_out = kernel.shape
  if kx > 1:
    low = (kx - 1) // 2  # lax's "SAME": the smaller half of the padding goes first
    padded = jnp.pad(x, ((0, 0), (low, kx - 1 - low), (0, 0), (0, 0), (0, 0)))
    x = jnp.concatenate([padded[:, i:i + sx] for i in range(kx)], axis=-1)
  images = x.reshape(n * sx, sy, sz, kx * c)
  kernel_2d = jnp.moveaxis(kernel, 0, 2).reshape(ky, kz, kx * c, c_out)
  y = lax.conv_general_dilated(images, kernel_2d, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               precision=precision)
  return y.reshape(n, sx, sy, sz, c_out)


def _is_channels_last_3d(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return (tuple(dimension_numbers.lhs_spec) == (0, 4, 1, 2, 3) and
            tuple(dimension_numbers.rhs_spec) == (4, 3, 0, 1, 2) and
            tuple(dimension_numbers.out_spec) == (0, 4, 1, 2, 3))
  return tuple(dimension_numbers) == ("NDHWC", "DHWIO", "NDHWC")


def conv_general_dilated_as_2d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                               precision=None, preferred_element_type=None):
  """Drop-in for `lax.conv_general_dilated` (e.g. `flax.linen.Conv(conv_general_dilated=...)`).

  Channels-last 3-D, stride-1, undilated, ungrouped "SAME" convolutions go through `conv3d_as_2d`;
  anything else is passed to `lax.conv_general_dilated` unchanged.
  """
  ones = lambda v: v is None or all(int(e) == 1 for e in v)
  if (lhs.ndim == 5 and _is_channels_last_3d(dimension_numbers) and ones(window_strides) and
      ones(lhs_dilation) and ones(rhs_dilation) and isinstance(padding, str) and padding.upper() == "SAME"
      and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None):
    return conv3d_as_2d(lhs, rhs, precision=precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                  precision=precision, preferred_element_type=preferred_element_type)


def _axis_marginals_com(weights: jax.Array) -> jax.Array:
  """Centre of mass (3,) of normalised `weights` (X, Y, Z), summing marginals instead of 3-D grids."""
  com = []
  for axis in range(3):
    other = tuple(a for a in range(3) if a != axis)
    marginal = weights.sum(axis=other)
    com.append(jnp.sum(marginal * jnp.arange(weights.shape[axis], dtype=weights.dtype)))
  return jnp.stack(com)


def center_of_mass(heatmap: jax.Array, *, kind: str = "relu") -> jax.Array:
  """Centre of mass of a heatmap: the paper's CoM layer (or a spatial soft-argmax).

  Args:
    heatmap: (X, Y, Z) float, one example and one channel.
    kind: "relu" (the paper's layer: weights = ReLU(heatmap) / sum) or "softmax" (weights =
      softmax(heatmap) over all voxels, the spatial soft-argmax).

  Returns:
    (3,) float32 coordinates in the heatmap's `_vox` frame.

  A dead ReLU heatmap (every weight zero) has no centre of mass; the "relu" layer then falls back to the
  softmax weights of the same heatmap, so it returns a finite point (the grid centre for a constant
  heatmap) and passes a non-zero gradient that can revive the heatmap, never NaN.
  """
  if kind not in CENTER_OF_MASS_KINDS:
    raise ValueError(f"kind must be one of {CENTER_OF_MASS_KINDS}, got {kind!r}")
  _check_volume("heatmap", heatmap)
  heatmap = jnp.asarray(heatmap, jnp.float32)
  soft = jax.nn.softmax(heatmap.reshape(-1)).reshape(heatmap.shape)
  if kind == "softmax":
    return _axis_marginals_com(soft)
  relu = jax.nn.relu(heatmap)
  total = relu.sum()
  alive = total > 0
  weights = jnp.where(alive, relu / jnp.where(alive, total, 1.0), soft)
  return _axis_marginals_com(weights)


def patch_grid_vox(center_vox: jax.Array, *, shape, step=1.0) -> jax.Array:
  """Where a patch's voxels sit in the volume: (3, nx, ny, nz) volume `_vox` coordinates.

  Patch index ``j`` on an axis of length ``n`` samples ``center_vox + (j - (n - 1) / 2) * step``.
  """
  shape = as_shape3(shape)
  center_vox = jnp.asarray(center_vox, jnp.float32)
  step = jnp.broadcast_to(jnp.asarray(step, jnp.float32), (3,))
  axes = [center_vox[a] + (jnp.arange(n, dtype=jnp.float32) - (n - 1) / 2) * step[a]
          for a, n in enumerate(shape)]
  return jnp.stack(jnp.meshgrid(*axes, indexing="ij"))


def patch_to_volume_vox(points_patch_vox: jax.Array, center_vox: jax.Array, *, shape,
                        step=1.0) -> jax.Array:
  """Maps points (..., 3) from a patch's `_vox` frame to the volume's, for a patch cut by `crop_patch`."""
  shape = jnp.asarray(as_shape3(shape), jnp.float32)
  return center_vox + (points_patch_vox - (shape - 1) / 2) * jnp.asarray(step, jnp.float32)


def crop_patch(volume: jax.Array, center_vox: jax.Array, *, shape, step=1.0) -> jax.Array:
  """Differentiable crop-and-resample: a patch of `volume` centred exactly at `center_vox`.

  Args:
    volume: (X, Y, Z) array; integer volumes are cast to float32 first.
    center_vox: (3,) patch centre in the volume's `_vox` frame (need not be an integer, may lie outside).
    shape: patch shape, an int or 3 ints.
    step: distance between neighbouring patch voxels in volume voxels, scalar or (3,); 1 keeps the
      volume's resolution, 0.5 samples twice as finely.

  Returns:
    (nx, ny, nz) float patch, trilinear samples; points outside the volume take the nearest edge value.
    Differentiable with respect to `volume` and `center_vox`.
  """
  _check_volume("volume", volume)
  volume = jnp.asarray(volume)
  if not jnp.issubdtype(volume.dtype, jnp.floating):
    volume = volume.astype(jnp.float32)
  if jnp.shape(center_vox) != (3,):
    raise ValueError(f"center_vox must have shape (3,), got {jnp.shape(center_vox)}")
  step_shape = step.shape if isinstance(step, jax.Array) else np.shape(step)
  if step_shape not in ((), (3,)):
    raise ValueError(f"step must be a scalar or have shape (3,), got shape {step_shape}")
  try:  # a concrete step is checked; a traced one (e.g. under jit) cannot be
    concrete_step = np.asarray(step, dtype=np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    concrete_step = None
  if concrete_step is not None and not np.all(concrete_step > 0):
    raise ValueError(f"step must be positive, got {step!r}")
  coords = patch_grid_vox(center_vox, shape=shape, step=step).astype(volume.dtype)
  return map_coordinates(volume, list(coords), order=1, mode="nearest")


def gaussian_heatmap(shape, center_vox: jax.Array, *, sigma_vox) -> jax.Array:
  """Unnormalised Gaussian blob (peak 1 at `center_vox`), the heatmap-regression target.

  Args:
    shape: heatmap shape (X, Y, Z).
    center_vox: (3,) centre in the heatmap's `_vox` frame.
    sigma_vox: standard deviation in voxels, scalar or (3,) (e.g. 6 mm / spacing for the paper's target).

  Returns:
    (X, Y, Z) float32, built as the outer product of three 1-D Gaussians.
  """
  shape = as_shape3(shape)
  center_vox = jnp.asarray(center_vox, jnp.float32)
  sigma_vox = jnp.broadcast_to(jnp.asarray(sigma_vox, jnp.float32), (3,))
  g = [jnp.exp(-0.5 * ((jnp.arange(n, dtype=jnp.float32) - center_vox[a]) / sigma_vox[a]) ** 2)
       for a, n in enumerate(shape)]
  return g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]


def heatmap_argmax(heatmap: jax.Array) -> jax.Array:
  """`_vox` coordinates (3,) float32 of a heatmap's (X, Y, Z) largest voxel (the first one on ties)."""
  _check_volume("heatmap", heatmap)
  index = jnp.unravel_index(jnp.argmax(heatmap.reshape(-1)), heatmap.shape)
  return jnp.stack(index).astype(jnp.float32)


def _blur_axis_stride2(x: jax.Array, axis: int) -> jax.Array:
  """[1, 2, 1] / 4 filter along `axis` with reflect padding, sampled at even positions (n -> n / 2)."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 1)
  p = jnp.pad(x, pad, mode="reflect")
  n = x.shape[axis]

  def take(start):
    return jax.lax.slice_in_dim(p, start, start + n - 1, stride=2, axis=axis)

  return 0.25 * take(0) + 0.5 * take(1) + 0.25 * take(2)


def blur_pool(x: jax.Array, *, spatial_axes: Sequence[int] = (1, 2, 3)) -> jax.Array:
  """Anti-aliased 2x down-sampling (Zhang 2019, "BlurPool"): binomial [1, 2, 1] blur, then stride 2.

  `x` is channels-last, e.g. (N, X, Y, Z, C); every spatial size must be even. Output (N, X/2, Y/2, Z/2, C).
  """
  for axis in spatial_axes:
    x = _blur_axis_stride2(x, axis)
  return x


def max_blur_pool(x: jax.Array, *, spatial_axes: Sequence[int] = (1, 2, 3)) -> jax.Array:
  """Zhang's MaxBlurPool: a dense 2x2x2 max (stride 1, edge-padded at the far end), then `blur_pool`."""
  pad = [(0, 0)] * x.ndim
  for axis in spatial_axes:
    pad[axis] = (0, 1)
  p = jnp.pad(x, pad, mode="edge")
  window = tuple(2 if axis in spatial_axes else 1 for axis in range(x.ndim))
  dense_max = jax.lax.reduce_window(p, -jnp.inf, jax.lax.max, window, (1,) * x.ndim, "VALID")
  return blur_pool(dense_max, spatial_axes=spatial_axes)
