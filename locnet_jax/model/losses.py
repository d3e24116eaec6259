"""Losses in world millimetres, masked for missing landmarks, and the paper's loss-weight schedule.

Targets are (..., K, 3) RAS mm with NaN rows for missing landmarks (as `io.load_landmarks` gives them).
A missing landmark contributes nothing to a loss and nothing to its denominator; its NaNs never reach a
gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from locnet_jax import geometry
from locnet_jax.model import ops


def landmark_mask(target_mm: jax.Array) -> jax.Array:
  """(..., K) bool: True where the landmark is annotated (all three coordinates finite)."""
  return jnp.all(jnp.isfinite(target_mm), axis=-1)


def squared_error_mm(pred_mm: jax.Array, target_mm: jax.Array) -> jax.Array:
  """Squared Euclidean distance (..., K) mm^2 between `pred_mm` and `target_mm` (broadcast), 0 if missing."""
  mask = landmark_mask(target_mm)
  safe_target = jnp.where(mask[..., None], target_mm, 0.0)
  sq = jnp.sum((pred_mm - safe_target) ** 2, axis=-1)
  return jnp.where(jnp.broadcast_to(mask, sq.shape), sq, 0.0)


def per_scale_loss(pred_mm: jax.Array, target_mm: jax.Array, *, only: jax.Array | None = None) -> jax.Array:
  """Mean squared Euclidean error per scale (S,) mm^2, over every annotated (example, landmark) pair.

  Args:
    pred_mm: (B, S, K, 3) predictions of every scale.
    target_mm: (B, K, 3) truths, NaN rows for missing landmarks.
    only: (B, S, K) bool, optional: the pairs each scale's sum keeps (`in_patch`); the denominator stays
      the count of annotated pairs, so a dropped pair removes its term and nothing else.
  """
  if pred_mm.ndim != 4 or target_mm.shape != (pred_mm.shape[0],) + pred_mm.shape[2:]:
    raise ValueError(f"pred_mm must be (B, S, K, 3) and target_mm (B, K, 3), got {pred_mm.shape} "
                     f"and {target_mm.shape}")
  sq = squared_error_mm(pred_mm, target_mm[:, None])  # (B, S, K)
  if only is not None:
    sq = jnp.where(only, sq, 0.0)
  count = jnp.sum(landmark_mask(target_mm))
  return jnp.sum(sq, axis=(0, 2)) / jnp.maximum(count, 1)


def in_patch(target_mm: jax.Array, center_mm: jax.Array, half_mm) -> jax.Array:
  """(B, S, K) bool: whether each annotated landmark lies inside scale s's input patch, the box of
  half-widths `half_mm[s]` mm per world axis around `center_mm` (B, S, K, 3) RAS mm (the model's
  "center_mm": where each scale's input was cut, the noise shift included). `target_mm` (B, K, 3), NaN
  rows missing (False). The pyramids are resampled onto RAS-aligned grids, so a patch is a world box."""
  half = jnp.asarray(half_mm, jnp.float32)[None, :, None, None]
  offset = jnp.abs(jnp.where(landmark_mask(target_mm)[:, None, :, None], target_mm[:, None] - center_mm, jnp.inf))
  return jnp.all(offset <= half, axis=-1)


def cut_away_loss(pred_mm: jax.Array, target_mm: jax.Array, cut: jax.Array) -> jax.Array:
  """Mean radial error (mm, not squared) of the landmarks a field-of-view crop cut away, over every
  annotated (example, landmark) pair: the term that teaches a scale where a landmark lies beyond the image's
  edge (`eval/qc.py` reads presence from it).

  Why the radial error: a cut-away landmark can lie tens of mm outside a slab, where only the head's
  general shape tells where; its squared error (hundreds of mm^2) swamped the present landmarks' loss and
  set the training back (measured: docs/results.md). The radial error pulls as hard at 40 mm as at 4 mm.

  Args:
    pred_mm: (B, K, 3) one scale's predictions; target_mm: (B, K, 3), NaN rows missing.
    cut: (B, K) bool, True for landmarks cut away (annotated, `present` 0).
  """
  mask = landmark_mask(target_mm)
  safe_target = jnp.where(mask[..., None], target_mm, 0.0)
  radial = jnp.sqrt(jnp.sum((pred_mm - safe_target) ** 2, axis=-1) + 1e-6)
  return jnp.sum(jnp.where(cut & mask, radial, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def weighted_loss(per_scale: jax.Array, weights: jax.Array) -> jax.Array:
  """The paper's training loss: sum_s weights[s] * per_scale[s] (weights need not sum to 1)."""
  return jnp.sum(jnp.asarray(weights, per_scale.dtype) * per_scale)


def presence_loss(logit: jax.Array, present: jax.Array) -> jax.Array:
  """Mean binary cross-entropy of presence logits (B, K) against `present` (B, K): 1 in the image, 0 absent,
  NaN unknown (ignored, as is everything when nothing is known)."""
  known = jnp.isfinite(present)
  bce = optax.sigmoid_binary_cross_entropy(logit, jnp.where(known, present, 0.0))
  return jnp.sum(jnp.where(known, bce, 0.0)) / jnp.maximum(jnp.sum(known), 1)


def heatmap_targets(target_mm: jax.Array, affine: jax.Array, *, shape, sigma_mm: float) -> jax.Array:
  """Gaussian heatmap targets (X, Y, Z, K) of one example, peak 1 at each landmark, 0 for missing ones.

  Args:
    target_mm: (K, 3) RAS mm, NaN rows for missing landmarks.
    affine: (4, 4) voxel->RAS of the heatmap's grid; the std is `sigma_mm` along each voxel axis
      (paper: 6 mm).
  """
  mask = landmark_mask(target_mm)
  center_vox = geometry.mm_to_vox(jnp.where(mask[:, None], target_mm, 0.0), jnp.asarray(affine))
  sigma_vox = sigma_mm / geometry.voxel_spacing_mm(jnp.asarray(affine, jnp.float32))
  blob = lambda c: ops.gaussian_heatmap(shape, c, sigma_vox=sigma_vox)  # noqa: E731
  heatmaps = jax.vmap(blob, out_axes=-1)(center_vox)
  return heatmaps * mask.astype(heatmaps.dtype)


def heatmap_l2_loss(heatmap: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared heatmap error over voxels of annotated channels.

  Args:
    heatmap, target: (B, X, Y, Z, K).
    mask: (B, K) bool, False for missing landmarks (their channel is ignored).
  """
  per_channel = jnp.mean((heatmap - target) ** 2, axis=(1, 2, 3))  # (B, K)
  return jnp.sum(jnp.where(mask, per_channel, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def loss_weight_schedules(*, num_epochs: int, num_scales: int) -> list[optax.Schedule]:
  """The paper's per-scale weight schedules, as Optax schedules of the *half-epoch* count 2 * epoch.

  Scale 0 falls linearly 1 -> 0 over `num_epochs`; the last scale rises 0 -> 1; each middle scale rises
  0 -> 1 until `num_epochs / 2`, then falls back to 0. Counting half-epochs keeps the peak exact for odd
  `num_epochs`, since Optax's transition points are integers.
  """
  if not isinstance(num_epochs, int) or num_epochs < 1:
    raise ValueError(f"num_epochs must be an int >= 1, got {num_epochs!r}")
  if not isinstance(num_scales, int) or num_scales < 1:
    raise ValueError(f"num_scales must be an int >= 1, got {num_scales!r}")
  if num_scales == 1:
    return [optax.constant_schedule(1.0)]
  t = num_epochs
  middle = optax.join_schedules([optax.linear_schedule(0.0, 1.0, t), optax.linear_schedule(1.0, 0.0, t)],
                                boundaries=[t])
  return ([optax.linear_schedule(1.0, 0.0, 2 * t)] + [middle] * (num_scales - 2)
          + [optax.linear_schedule(0.0, 1.0, 2 * t)])


def loss_weights(epoch, *, num_epochs: int, num_scales: int) -> jax.Array:
  """Per-scale loss weights (num_scales,) float32 for `epoch` (0-based), constant within an epoch.

  A fractional `epoch` (e.g. step / steps_per_epoch) is floored; works under `jax.jit` with a traced
  epoch. Weights are relative, not normalised: at the middle epoch of 4 scales they are [.5, 1, 1, .5].
  """
  schedules = loss_weight_schedules(num_epochs=num_epochs, num_scales=num_scales)
  half_epochs = 2 * jnp.floor(jnp.asarray(epoch, jnp.float32)).astype(jnp.int32)
  return jnp.stack([jnp.asarray(f(half_epochs), jnp.float32) for f in schedules])


def multistep_phase(epoch: int, *, num_epochs: int, num_scales: int) -> int:
  """The scale the multi-step baseline trains during `epoch`: equal consecutive shares, coarse first."""
  if not isinstance(num_epochs, int) or num_epochs < num_scales:
    raise ValueError(f"multi-step training needs num_epochs >= num_scales = {num_scales}, got {num_epochs!r}")
  return min(int(epoch) * num_scales // num_epochs, num_scales - 1)


def multistep_weights(epoch: int, *, num_epochs: int, num_scales: int) -> jax.Array:
  """One-hot (num_scales,) float32: only the scale being trained (`multistep_phase`) has loss weight 1.

  Used as the loss weights and as the trainable mask, so coarser, already trained scales stay frozen.
  """
  phase = multistep_phase(epoch, num_epochs=num_epochs, num_scales=num_scales)
  return jnp.zeros((num_scales,), jnp.float32).at[phase].set(1.0)
