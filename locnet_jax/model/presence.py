"""Presence outputs of the multi-scale Loc-Net: whether each landmark is in the image, as a logit per landmark,
read from the heatmaps' mass (`Presence`) or from the coarsest volume (`PresenceEncoder`). QC reads presence
from the field of view instead (`eval/qc.py`); these stay for models trained with `model.presence`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from locnet_jax.model import ops
from locnet_jax.model.unet import resolve_conv_impl


def log_mass(heatmap: jax.Array) -> jax.Array:
  """log(mean ReLU(heatmap) + 1e-6) over the last three (spatial) axes: (..., X, Y, Z) -> (...)."""
  return jnp.log(jnp.mean(jax.nn.relu(heatmap.astype(jnp.float32)), axis=(-3, -2, -1)) + 1e-6)


class Presence(nn.Module):
  """Whether each landmark is in the image, read from its heatmaps' mass: (B, S, K) log masses -> (B, K) logits.

  logit_k = sum_s a_sk * log_mass_sk + b_k, with a and b learnt per scale and landmark. Why the mass: the
  ReLU centre of mass ignores a heatmap's scale, so its total mass is a free output the coordinate loss
  never constrains; a presence loss can teach every scale to fire only where it sees its landmark's
  anatomy, at no extra computation. Scale 0 sees the whole image (is the anatomy there at all?), the
  finer scales their patch (is it inside the field of view, or is the patch cut off?).
  """

  num_landmarks: int

  @nn.compact
  def __call__(self, log_masses: jax.Array) -> jax.Array:
    num_scales = log_masses.shape[1]
    weight = self.param("weight", nn.initializers.constant(1.0 / num_scales), (num_scales, self.num_landmarks))
    bias = self.param("bias", nn.initializers.constant(4.0), (self.num_landmarks,))
    return jnp.sum(log_masses * weight, axis=1) + bias


class PresenceEncoder(nn.Module):
  """Whether each landmark is in the image, read from the image itself: coarsest volume (B, X, Y, Z) ->
  (B, K) logits.

  A small classifier (per level: 3x3x3 convolution, instance norm, ReLU, 2x2x2 max-pool; then the mean and
  the maximum over space, one hidden layer, K logits) with its own parameters, so its loss moves no
  coordinate. Why a separate reader: which landmarks a slab holds is a question about the whole image
  (which part of the head is this?), and neither the heatmaps' mass nor the coarse point answered it
  (docs/results.md, "Presence"). The bias starts at `bias_init` (most landmarks are present). Every
  spatial size must be divisible by ``2 ** len(channels)``.
  """

  num_landmarks: int
  channels: tuple[int, ...] = (8, 16, 32)
  hidden: int = 64
  bias_init: float = 3.0
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, volume: jax.Array) -> jax.Array:
    if volume.ndim != 4 or any(n % 2 ** len(self.channels) for n in volume.shape[1:]):
      raise ValueError(f"PresenceEncoder input must be (B, X, Y, Z) with sizes divisible by "
                       f"{2 ** len(self.channels)}, got {volume.shape}")
    as_2d = resolve_conv_impl(self.conv_impl) == "as_2d"
    x = volume[..., None].astype(jnp.float32)
    for level, features in enumerate(self.channels):
      x = nn.Conv(features, (3, 3, 3), padding="SAME", name=f"conv{level}",
                  conv_general_dilated=ops.conv_general_dilated_as_2d if as_2d else None)(x)
      x = nn.relu(nn.GroupNorm(num_groups=None, group_size=1, name=f"norm{level}")(x))
      x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
    x = jnp.concatenate([jnp.mean(x, axis=(1, 2, 3)), jnp.max(x, axis=(1, 2, 3))], axis=-1)
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.num_landmarks, name="logit", bias_init=nn.initializers.constant(self.bias_init))(x)
