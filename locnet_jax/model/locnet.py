"""The Loc-Net, the multi-scale Loc-Net of the paper, and the heatmap U-Net baseline (Flax Linen).

Every model maps images to landmark coordinates in world millimetres (RAS+). Inputs are channels-free
volumes ``(B, X, Y, Z)`` with their voxel->RAS affines ``(B, 4, 4)`` (or one ``(4, 4)`` shared by the
batch); outputs are dicts whose ``"pred_mm"`` is ``(B, S, K, 3)``: one prediction per scale ``S`` (coarse
to fine) for each of ``K`` landmarks, so the loss can weight every scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from locnet_jax import geometry
from locnet_jax.model import ops
from locnet_jax.model.presence import Presence, PresenceEncoder, log_mass
from locnet_jax.model.unet import UNet3D

PRESENCE_FROM = ("mass", "image")  # what a presence logit reads (MultiScaleLocNet.presence_from)
# `MultiScaleLocNet.landmark_offset`: the learnt offsets are this many mm per unit of their parameter, so Adam
# (steps of about one learning rate in parameter units) moves them mm-sized distances within one run
OFFSET_UNIT_MM = 20.0


def batched_affine(affine: jax.Array, batch: int, name: str) -> jax.Array:
  affine = jnp.asarray(affine, jnp.float32)
  if affine.shape == (4, 4):
    affine = jnp.broadcast_to(affine, (batch, 4, 4))
  if affine.shape != (batch, 4, 4):
    raise ValueError(f"{name} must be (4, 4) or (B, 4, 4) with B={batch}, got {affine.shape}")
  return affine


def _check_volumes(volumes: Sequence[jax.Array], num: int) -> None:
  if len(volumes) != num:
    raise ValueError(f"expected {num} volumes (coarse to fine), got {len(volumes)}")
  batch = volumes[0].shape[0] if volumes[0].ndim else None
  for s, v in enumerate(volumes):
    if v.ndim != 4 or v.shape[0] != batch:
      raise ValueError(f"volume {s} must be (B, X, Y, Z) with B={batch} like volume 0, got {v.shape}")


def resolve_patch_groups(value: int, count: int) -> int:
  """Into how many independent U-Net calls a batch of `count` patches is split: `value`, or for 0 (auto)
  one per patch (at most 8) on a CPU backend, 1 elsewhere.

  Why: XLA:CPU runs independent computations side by side, which keeps few cores busier than one small
  convolution's own threads can; a GPU wants one large batch. Measured in docs/performance.md ("patch
  groups"). The function is the same; the graph (and its compile time) grows with the groups.
  """
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ValueError(f"patch_groups must be an int >= 0 (0: auto), got {value!r}")
  if value == 0:
    value = 8 if jax.default_backend() == "cpu" else 1
  return max(1, min(value, count))


def refine(net, volume: jax.Array, affine: jax.Array, center_mm: jax.Array, *, num_landmarks: int,
           patch_shape, groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """One finer scale: a patch of `volume` around each centre, its landmark's heatmap channel, the CoM.

  Args:
    net: a `LocNet` (bound, or ``functools.partial(LocNet(...).apply, variables)``): (N, *patch), channel
      (N,) -> (coords_vox (N, 3), heatmaps (N, *patch)).
    volume: (B, X, Y, Z); affine: (B, 4, 4) voxel->RAS.
    center_mm: (B, M*K, 3) RAS mm, M groups of the K landmarks in order (M noise samples, or 1).
    groups: `resolve_patch_groups` value: the B*M*K patches go through `net` in this many calls.

  Returns:
    (pred_mm (B, M*K, 3) RAS mm, heatmaps (B, M*K, *patch)).
  """
  center_vox = geometry.mm_to_vox(center_mm, affine[:, None])
  crop = lambda v, c: ops.crop_patch(v, c, shape=patch_shape)  # noqa: E731
  patches = jax.vmap(jax.vmap(crop, in_axes=(None, 0)))(volume, center_vox)  # (B, M*K, *patch)
  landmark = jnp.tile(jnp.arange(num_landmarks), center_mm.shape[0] * center_mm.shape[1] // num_landmarks)
  flat = patches.reshape(-1, *patches.shape[2:])
  bounds = np.linspace(0, flat.shape[0], resolve_patch_groups(groups, flat.shape[0]) + 1).astype(int)
  outs = [net(flat[a:b], landmark[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
  patch_vox, heatmap = (jnp.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*outs))
  vox = ops.patch_to_volume_vox(patch_vox.reshape(center_vox.shape), center_vox, shape=patch_shape)
  return geometry.vox_to_mm(vox, affine[:, None]), heatmap.reshape(patches.shape)


class LocNet(nn.Module):
  """U-Net + centre-of-mass layer: (N, X, Y, Z) images -> `_vox` coordinates of K landmarks.

  `__call__(x, channel=None)` returns ``(coords_vox, heatmaps)``: with ``channel=None`` the centre of
  mass of every output channel, coords (N, K, 3); with an int array ``channel`` of shape (N,), only that
  channel of each example (the landmark a patch was cut for), coords (N, 3). Heatmaps are (N, X, Y, Z, K)
  or (N, X, Y, Z) accordingly. `conditioned`: the U-Net also reads ``channel`` (its normalisations are
  conditioned on the landmark, `UNet3D.num_conditions`); it then needs ``channel``.
  """

  num_landmarks: int
  unet: Mapping[str, Any] = None
  com_kind: str = "relu"
  conditioned: bool = False

  def __post_init__(self):
    if self.com_kind not in ops.CENTER_OF_MASS_KINDS:
      raise ValueError(f"com_kind must be one of {ops.CENTER_OF_MASS_KINDS}, got {self.com_kind!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, channel: jax.Array | None = None):
    if x.ndim != 4:
      raise ValueError(f"LocNet input must be (N, X, Y, Z), got shape {x.shape}")
    if self.conditioned and channel is None:
      raise ValueError("a conditioned LocNet needs the landmark `channel` of each patch")
    heatmaps = UNet3D(out_channels=self.num_landmarks, name="unet", **dict(self.unet or {}),
                      num_conditions=self.num_landmarks if self.conditioned else 0)(
        x[..., None].astype(jnp.float32), channel if self.conditioned else None)
    com = lambda h: ops.center_of_mass(h, kind=self.com_kind)  # noqa: E731
    if channel is None:
      coords = jax.vmap(jax.vmap(com, in_axes=-1))(heatmaps)
      return coords, heatmaps
    heatmaps = jnp.take_along_axis(heatmaps, channel[:, None, None, None, None], axis=-1)[..., 0]
    return jax.vmap(com)(heatmaps), heatmaps


class MultiScaleLocNet(nn.Module):
  """The paper's multi-scale Loc-Net: `num_scales` Loc-Nets chained coarse to fine by a differentiable crop.

  Scale 0 sees the whole coarsest volume and predicts all K landmarks (one heatmap channel each). Each
  finer scale s cuts, for every landmark k, a `patch_shape` patch of volume s centred at scale s-1's
  prediction for k (through `ops.crop_patch`, so gradients reach the coarser scales) and reads channel k
  of its heatmap: two landmarks a few millimetres apart share a patch but never a channel. Predictions
  move between scales in world mm, so each volume only needs its own affine; the scales' spacings
  (paper: 4, 2, 1, 0.5 mm, with 56^3 patches) are whatever the pyramid holds.

  With ``num_scales=1`` this is the single-scale Loc-Net baseline (whole volume in, see
  `single_scale_locnet`).

  Attributes:
    num_landmarks: K.
    num_scales: S, the number of volumes (pyramid levels) the model takes.
    patch_shape: (3,) patch size of the finer scales, in voxels of their own level.
    unet: keyword arguments of every scale's `UNet3D` (out_channels is K).
    com_kind: centre-of-mass weights, "relu" (paper) or "softmax".
    noise_mm: half-width r of the uniform shift U(-r, r) mm per world axis added to the centres before
      the finest crop, when `__call__` gets a `noise_key` (paper: 5 mm).
    stop_gradient: cut gradients between scales (the paper's multi-step baseline).
    patch_groups: the finer scales' patches go through their U-Net in this many independent calls
      (`resolve_patch_groups`; 0: auto, by backend): speed only, the same function and parameters.
    presence: also output "presence_logit" (B, K), whether each landmark is in the image.
    presence_from: what the presence logit reads (`PRESENCE_FROM`): "mass", the scales' heatmap masses
      (`Presence`); "image", its own small classifier of the coarsest volume (`PresenceEncoder`).
    coarse_unet: overrides of `unet` for scale 0 (e.g. a deeper U-Net, whose receptive field spans the
      whole field of view: it must place landmarks the image cuts away); None: `unet`.
    coarse_com_kind: scale 0's centre-of-mass kind; None: `com_kind`.
    finest_unet: overrides of `unet` for the finest scale S-1 (e.g. more channels: it sets the accuracy,
      and costs one K-patch batch like every other finer scale); None: `unet`. Ignored when S = 1.
    landmark_film: the finer scales' U-Nets know which landmark each patch was cut for (their
      normalisations conditioned on it: `LocNet.conditioned`): one U-Net serves K landmarks without
      inferring which from the patch (mirror pairs, neighbours). Zero at init, so a plain model's export
      warm-starts it as the same function.
    train_shift_mm: training only (`__call__`'s `shift_key`): half-widths r_s of a uniform shift U(-r_s, r_s)
      mm per world axis added to the centre of each intermediate finer scale s = 1 .. S-2 before its crop
      (the finest scale has `noise_mm`): each scale learns to correct a coarser scale's miss of up to r_s,
      as on images unlike the training ones. Empty: none (the paper).
    landmark_offset: a learnt constant RAS mm offset per scale and landmark, (S, K, 3), added to each
      scale's centre of mass (so also to the next scale's crop centre): the per-landmark bias a
      shift-equivariant U-Net cannot express (it places a landmark where its local features are, and a
      landmark's definition can sit a fixed sub-voxel distance from them; docs/design.md). Zero at init,
      so a model without it warm-starts as the same function; `OFFSET_UNIT_MM` mm per parameter unit.
  """

  num_landmarks: int
  num_scales: int = 4
  patch_shape: tuple[int, int, int] = (56, 56, 56)
  unet: Mapping[str, Any] = None
  com_kind: str = "relu"
  noise_mm: float = 5.0
  stop_gradient: bool = False
  patch_groups: int = 0
  presence: bool = False
  presence_from: str = "mass"
  coarse_unet: Mapping[str, Any] | None = None
  coarse_com_kind: str | None = None
  finest_unet: Mapping[str, Any] | None = None
  landmark_film: bool = False
  train_shift_mm: tuple[float, ...] = ()
  landmark_offset: bool = False

  def __post_init__(self):
    if not isinstance(self.num_landmarks, int) or self.num_landmarks < 1:
      raise ValueError(f"num_landmarks must be an int >= 1, got {self.num_landmarks!r}")
    if not isinstance(self.num_scales, int) or self.num_scales < 1:
      raise ValueError(f"num_scales must be an int >= 1, got {self.num_scales!r}")
    ops.as_shape3(self.patch_shape)
    for name, kind in (("com_kind", self.com_kind), ("coarse_com_kind", self.coarse_com_kind or self.com_kind)):
      if kind not in ops.CENTER_OF_MASS_KINDS:
        raise ValueError(f"{name} must be one of {ops.CENTER_OF_MASS_KINDS}, got {kind!r}")
    if self.presence_from not in PRESENCE_FROM:
      raise ValueError(f"presence_from must be one of {PRESENCE_FROM}, got {self.presence_from!r}")
    if not self.noise_mm >= 0:
      raise ValueError(f"noise_mm must be >= 0, got {self.noise_mm!r}")
    resolve_patch_groups(self.patch_groups, 1)
    shifts = tuple(self.train_shift_mm)
    if shifts and (len(shifts) != self.num_scales - 2 or not all(r >= 0 for r in shifts)):
      raise ValueError(f"train_shift_mm must hold one half-width >= 0 for each of the {max(self.num_scales - 2, 0)} "
                       f"intermediate scales (1 .. S-2), got {shifts!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, volumes: Sequence[jax.Array], affines: Sequence[jax.Array], *,
               noise_key: jax.Array | None = None, num_samples: int | None = None,
               shift_key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Predicts every scale's landmark positions.

    Args:
      volumes: S arrays (B, X_s, Y_s, Z_s), coarse to fine.
      affines: S voxel->RAS affines, each (B, 4, 4) or (4, 4).
      noise_key: PRNG key; when given, the finest crop is centred at a randomly shifted point.
      num_samples: with `noise_key`, test-time uncertainty: the coarser scales run once and the finest
        scale runs for N = num_samples shifts at once (one batch of N*B*K patches); sample n uses the key
        ``jax.random.split(noise_key, N)[n]``, so it equals a single pass with that key.
      shift_key: training only, with `train_shift_mm`: PRNG key of the intermediate scales' shifts
        (scale s draws with ``fold_in(shift_key, s)``); None: no such shift.

    Returns:
      {"pred_mm": (B, S, K, 3) RAS mm, "center_mm": (B, S, K, 3) the centre each scale's input was cut
      at (scale 0: the coarsest volume's centre)}. With `num_samples`, the finest entries of both are
      the means over the samples, and "samples_mm" (B, N, K, 3) holds every sample's finest prediction.
    """
    _check_volumes(volumes, self.num_scales)
    if len(affines) != self.num_scales:
      raise ValueError(f"expected {self.num_scales} affines, got {len(affines)}")
    if noise_key is not None and self.num_scales == 1:
      raise ValueError("noise injection needs at least 2 scales (it shifts the finest crop's centre)")
    if num_samples is not None and (noise_key is None or not isinstance(num_samples, int) or num_samples < 1):
      raise ValueError(f"num_samples needs a noise_key and must be an int >= 1, got {num_samples!r}")
    batch, k_count = volumes[0].shape[0], self.num_landmarks
    affines = [batched_affine(a, batch, f"affine {s}") for s, a in enumerate(affines)]
    nets = [scale_net(self, s, name=f"scale{s}") for s in range(self.num_scales)]
    offset_mm = landmark_offset_mm(self, {"landmark_offset": self.param(
        "landmark_offset", nn.initializers.zeros, (self.num_scales, k_count, 3), jnp.float32)}
        if self.landmark_offset else {})
    coarse_vox, heatmap = nets[0](volumes[0])
    self.sow("intermediates", "heatmap0", heatmap)
    masses = [log_mass(jnp.moveaxis(heatmap, -1, 1))]  # (B, K) each
    pred_mm = [geometry.vox_to_mm(coarse_vox, affines[0][:, None]) + offset_mm[0]]
    grid_center_vox = (jnp.asarray(volumes[0].shape[1:4], jnp.float32) - 1) / 2
    center_mm = [jnp.broadcast_to(geometry.vox_to_mm(grid_center_vox, affines[0])[:, None],
                                  (batch, k_count, 3))]
    for s in range(1, self.num_scales):
      center = pred_mm[-1]
      if self.stop_gradient:
        center = jax.lax.stop_gradient(center)
      if shift_key is not None and self.train_shift_mm and s < self.num_scales - 1:
        center = center + noise_shifts_mm(jax.random.fold_in(shift_key, s), center.shape,
                                          radius_mm=float(self.train_shift_mm[s - 1]))
      if s == self.num_scales - 1 and noise_key is not None:
        center = self._shifted(center, noise_key, num_samples)  # (B, N*K, 3) with N samples, else (B, K, 3)
      pred, heatmap = refine(nets[s], volumes[s], affines[s], center, num_landmarks=k_count,
                             patch_shape=self.patch_shape, groups=self.patch_groups)
      self.sow("intermediates", f"heatmap{s}", heatmap)
      masses.append(jnp.mean(log_mass(heatmap).reshape(batch, -1, k_count), axis=1))
      pred_mm.append(pred + jnp.tile(offset_mm[s], (pred.shape[1] // k_count, 1)))  # every noise sample
      center_mm.append(center)
    out = {}
    if self.presence and self.presence_from == "image":
      out["presence_logit"] = PresenceEncoder(self.num_landmarks, conv_impl=(self.unet or {}).get(
          "conv_impl", "auto"), name="presence")(volumes[0])
    elif self.presence:
      out["presence_logit"] = Presence(self.num_landmarks, name="presence")(jnp.stack(masses, axis=1))
    if num_samples is not None:
      sampled = pred_mm[-1].reshape(batch, num_samples, k_count, 3)
      out["samples_mm"] = sampled
      pred_mm[-1] = jnp.mean(sampled, axis=1)
      center_mm[-1] = jnp.mean(center_mm[-1].reshape(batch, num_samples, k_count, 3), axis=1)
    return {**out, "pred_mm": jnp.stack(pred_mm, axis=1), "center_mm": jnp.stack(center_mm, axis=1)}

  def _shifted(self, center_mm: jax.Array, key: jax.Array, num_samples: int | None) -> jax.Array:
    """Centres (B, K, 3) + U(-r, r) mm per axis; with N samples (B, N*K, 3), sample n drawn with split key n."""
    if num_samples is None:
      return center_mm + noise_shifts_mm(key, center_mm.shape, radius_mm=self.noise_mm)
    shifted = center_mm[None] + noise_shifts_mm(key, center_mm.shape, radius_mm=self.noise_mm,
                                                num_samples=num_samples)  # (N, B, K, 3)
    return jnp.moveaxis(shifted, 0, 1).reshape(center_mm.shape[0], -1, 3)


def scale_net(model: MultiScaleLocNet, s: int, *, name: str | None = None) -> LocNet:
  """Scale s's Loc-Net of `model`, as the model builds it (its U-Net settings, centre-of-mass kind and landmark
  conditioning): inside the model with ``name=f"scale{s}"``, and unbound for the noise passes' finest scale
  (`inference.make_uncertainty`), which apply it to ``params[f"scale{s}"]``."""
  unet = dict(model.unet or {})
  if s == 0:
    return LocNet(model.num_landmarks, {**unet, **dict(model.coarse_unet or {})},
                  model.coarse_com_kind or model.com_kind, name=name)
  if s == model.num_scales - 1:
    unet = {**unet, **dict(model.finest_unet or {})}
  return LocNet(model.num_landmarks, unet, model.com_kind, model.landmark_film, name=name)


def landmark_offset_mm(model: MultiScaleLocNet, params) -> jax.Array:
  """The learnt offsets (S, K, 3) RAS mm of `model` (`MultiScaleLocNet.landmark_offset`) in `params`; zeros
  for a model without them."""
  if not model.landmark_offset:
    return jnp.zeros((model.num_scales, model.num_landmarks, 3), jnp.float32)
  return OFFSET_UNIT_MM * params["landmark_offset"]


def noise_shifts_mm(key: jax.Array, shape, *, radius_mm: float, num_samples: int | None = None) -> jax.Array:
  """The injected shifts, U(-radius, radius) mm per axis: `shape`, or (N, *shape) with sample n drawn from
  ``jax.random.split(key, N)[n]`` (so sample n equals one noisy pass with that key)."""
  draw = lambda k: jax.random.uniform(k, shape, minval=-radius_mm, maxval=radius_mm)  # noqa: E731
  if num_samples is None:
    return draw(key)
  return jax.vmap(draw)(jax.random.split(key, num_samples))


def single_scale_locnet(num_landmarks: int, *, unet: Mapping[str, Any], extra_levels: int = 1,
                        com_kind: str = "relu") -> MultiScaleLocNet:
  """The single-scale Loc-Net baseline of the paper's Table 1: one Loc-Net on the whole (1 mm) volume.

  The paper's footnote 2 gives it one more convolution + down-sampling level than the multi-scale nets:
  `extra_levels` is added to ``unet["depth"]`` (default depth 2).
  """
  unet = dict(unet)
  unet["depth"] = unet.get("depth", UNet3D.depth) + extra_levels
  return MultiScaleLocNet(num_landmarks, num_scales=1, unet=unet, com_kind=com_kind)


class HeatmapUNet(nn.Module):
  """The heatmap-regression baseline: a U-Net whose K output channels regress Gaussian blobs.

  Trained with `losses.heatmap_l2_loss` against `losses.heatmap_targets` (paper: std 6 mm); predicts
  each landmark at its heatmap's largest voxel.

  `__call__(volumes, affines)` takes a one-level pyramid like `MultiScaleLocNet(num_scales=1)`: volumes
  ``[(B, X, Y, Z)]`` and affines ``[(B, 4, 4) or (4, 4)]``; it returns {"pred_mm": (B, 1, K, 3) RAS mm,
  "heatmap": (B, X, Y, Z, K)}.
  """

  num_landmarks: int
  unet: Mapping[str, Any] = None

  @nn.compact
  def __call__(self, volumes: Sequence[jax.Array], affines: Sequence[jax.Array]) -> dict[str, jax.Array]:
    _check_volumes(volumes, 1)
    if len(affines) != 1:
      raise ValueError(f"expected 1 affine, got {len(affines)}")
    volume, affine = volumes[0], batched_affine(affines[0], volumes[0].shape[0], "affine")
    heatmap = UNet3D(out_channels=self.num_landmarks, name="unet", **dict(self.unet or {}))(
        volume[..., None].astype(jnp.float32))
    argmax_vox = jax.vmap(jax.vmap(ops.heatmap_argmax, in_axes=-1))(heatmap)  # (B, K, 3)
    pred_mm = geometry.vox_to_mm(argmax_vox, affine[:, None])
    return {"pred_mm": pred_mm[:, None], "heatmap": heatmap}
