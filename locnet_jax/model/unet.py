"""A configurable 3-D U-Net (Flax Linen, channels-last), the body of every Loc-Net.

Shapes: input (N, X, Y, Z, C_in) -> output (N, X, Y, Z, out_channels); every spatial size must be
divisible by ``2 ** depth``. Level ``l`` (0 = full resolution) has ``round(base_channels *
channel_growth ** l)`` channels.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from locnet_jax.model import ops

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "silu": nn.silu,
}
NORMS = ("none", "group", "instance")
# "max": 2x2x2 max-pool; "max_blur": Zhang's anti-aliased MaxBlurPool; "blur": BlurPool alone
# (anti-aliased average); all halve each spatial size.
DOWNSAMPLES = ("max", "max_blur", "blur")
# "nearest" + conv is faster than "transpose" on XLA:CPU; "linear" is trilinear (anti-aliased) up-sampling.
UPSAMPLES = ("nearest", "linear", "transpose")
# How 3-D convolutions are computed (same function, same parameters): "xla" = lax's 3-D convolution;
# "as_2d" = `ops.conv3d_as_2d`, a 2-D convolution over x-slices, several times faster on XLA:CPU;
# "auto" = "as_2d" when JAX's default backend is the CPU, else "xla" (cuDNN's 3-D kernels on GPU).
CONV_IMPLS = ("auto", "xla", "as_2d")
# Compute dtype of the convolutions, norms and activations (parameters stay float32; the heatmap head and
# its output are float32 so the centre of mass is not rounded): "bfloat16" is for GPUs' tensor cores.
DTYPES = ("float32", "bfloat16")


def resolve_conv_impl(impl: str) -> str:
  """"auto" -> "as_2d" on a CPU default backend, "xla" elsewhere; other values pass through."""
  _choice("conv_impl", impl, CONV_IMPLS)
  if impl == "auto":
    return "as_2d" if jax.default_backend() == "cpu" else "xla"
  return impl


def _choice(name: str, value, options) -> None:
  if value not in options:
    raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def _positive_int(name: str, value, minimum: int = 1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _downsample(x: jax.Array, kind: str) -> jax.Array:
  if kind == "max":
    return nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
  if kind == "max_blur":
    return ops.max_blur_pool(x)
  return ops.blur_pool(x)


def _upsample_fixed(x: jax.Array, kind: str) -> jax.Array:
  n, sx, sy, sz, c = x.shape
  if kind == "nearest":
    return jnp.repeat(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), 2, axis=3)
  return jax.image.resize(x, (n, 2 * sx, 2 * sy, 2 * sz, c), method="trilinear")


class UNet3D(nn.Module):
  """3-D U-Net: `convs_per_level` (conv -> norm -> activation) blocks per level, `depth` down-samplings.

  The decoder's first convolution over ``concat(up, skip)`` is written as the sum of two convolutions
  (one per input): the same function, and it avoids XLA:CPU's huge scratch buffers for convolutions over
  concatenations at large sizes. The last layer is a 1x1x1 convolution to `out_channels` (no activation),
  its bias initialised to `head_bias_init`. `conv_impl` picks how the 3-D convolutions are computed
  (`CONV_IMPLS`); it changes speed only, not the parameters or the function. `dtype` is the compute dtype
  of every layer but the head (`DTYPES`); the parameters are float32 whatever it is, so a model trained in
  one dtype runs in the other.

  `num_conditions` > 0 makes every normalisation conditional (Dumoulin et al. 2017): ``__call__(x,
  condition)`` with an int array (N,) in [0, num_conditions) scales and shifts each normalised channel by
  ``1 + gamma[c]`` and ``beta[c]``, learnt per condition (parameters ``<norm name>_film``, zero at init, so a
  conditioned U-Net starts as the plain one and can be warm-started from it).
  """

  out_channels: int
  depth: int = 2
  base_channels: int = 16
  channel_growth: float = 2.0
  convs_per_level: int = 2
  kernel_size: int = 3
  norm: str = "none"
  norm_groups: int = 8
  activation: str = "relu"
  downsample: str = "max"
  upsample: str = "nearest"
  head_bias_init: float = 0.0
  conv_impl: str = "auto"
  dtype: str = "float32"
  num_conditions: int = 0

  def __post_init__(self):
    _positive_int("out_channels", self.out_channels)
    _positive_int("num_conditions", self.num_conditions, minimum=0)
    _positive_int("depth", self.depth, minimum=0)
    _positive_int("base_channels", self.base_channels)
    _positive_int("convs_per_level", self.convs_per_level)
    _positive_int("kernel_size", self.kernel_size)
    if not isinstance(self.channel_growth, (int, float)) or self.channel_growth <= 0:
      raise ValueError(f"channel_growth must be a positive number, got {self.channel_growth!r}")
    _choice("norm", self.norm, NORMS)
    _choice("activation", self.activation, ACTIVATIONS)
    _choice("downsample", self.downsample, DOWNSAMPLES)
    _choice("upsample", self.upsample, UPSAMPLES)
    _choice("conv_impl", self.conv_impl, CONV_IMPLS)
    _choice("dtype", self.dtype, DTYPES)
    if self.norm == "group":
      _positive_int("norm_groups", self.norm_groups)
      for c in self.level_channels:
        if c % self.norm_groups:
          raise ValueError(f"norm='group' needs every level's channels {self.level_channels} divisible by "
                           f"norm_groups={self.norm_groups}")
    super().__post_init__()

  @property
  def level_channels(self) -> tuple[int, ...]:
    return tuple(max(1, round(self.base_channels * self.channel_growth ** l))
                 for l in range(self.depth + 1))

  def check_input_shape(self, shape) -> None:
    """Raises ValueError unless `shape` is (N, X, Y, Z, C) with X, Y, Z divisible by 2**depth."""
    if len(shape) != 5:
      raise ValueError(f"UNet3D input must be (N, X, Y, Z, C), got shape {tuple(shape)}")
    factor = 2 ** self.depth
    if any(n % factor or n == 0 for n in shape[1:4]):
      raise ValueError(f"UNet3D input spatial shape {tuple(shape[1:4])} must be divisible by "
                       f"2**depth = {factor} (depth={self.depth})")

  def _norm(self, x: jax.Array, name: str, condition: jax.Array | None = None) -> jax.Array:
    if self.norm == "group":
      x = nn.GroupNorm(num_groups=self.norm_groups, dtype=self.dtype, name=name)(x)
    elif self.norm == "instance":
      x = nn.GroupNorm(num_groups=None, group_size=1, dtype=self.dtype, name=name)(x)
    if condition is None:
      return x
    film = nn.Embed(self.num_conditions, 2 * x.shape[-1], embedding_init=nn.initializers.zeros,
                    name=f"{name}_film")(condition).astype(x.dtype)[:, None, None, None, :]  # (N, 1, 1, 1, 2C)
    gamma, beta = jnp.split(film, 2, axis=-1)
    return x * (1 + gamma) + beta

  def _conv(self, features: int, name: str, use_bias: bool = True) -> nn.Conv:
    as_2d = resolve_conv_impl(self.conv_impl) == "as_2d"
    return nn.Conv(features, (self.kernel_size,) * 3, padding="SAME", use_bias=use_bias, name=name,
                   dtype=self.dtype, conv_general_dilated=ops.conv_general_dilated_as_2d if as_2d else None)

  def _block(self, x: jax.Array, features: int, level: str, first: jax.Array | None = None,
             condition: jax.Array | None = None) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    for i in range(self.convs_per_level):
      if i == 0 and first is not None:
        x = first + self._conv(features, f"{level}_conv0_skip", use_bias=False)(x)
      else:
        x = self._conv(features, f"{level}_conv{i}")(x)
      x = act(self._norm(x, f"{level}_norm{i}", condition))
    return x

  @nn.compact
  def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    """x (N, X, Y, Z, C) -> (N, X, Y, Z, out_channels); `condition` (N,) ints, only with num_conditions."""
    self.check_input_shape(x.shape)
    if (condition is None) != (self.num_conditions == 0):
      raise ValueError(f"UNet3D with num_conditions={self.num_conditions} called with condition "
                       f"{'None' if condition is None else 'given'}")
    if condition is not None and tuple(jnp.shape(condition)) != (x.shape[0],):
      raise ValueError(f"condition must be ({x.shape[0]},) ints, got shape {tuple(jnp.shape(condition))}")
    x = x.astype(self.dtype)
    channels = self.level_channels
    skips = []
    for level in range(self.depth):
      x = self._block(x, channels[level], f"enc{level}", condition=condition)
      skips.append(x)
      x = _downsample(x, self.downsample)
    x = self._block(x, channels[self.depth], "bottom", condition=condition)
    for level in reversed(range(self.depth)):
      if self.upsample == "transpose":
        x = nn.ConvTranspose(channels[level], (2, 2, 2), strides=(2, 2, 2), dtype=self.dtype, name=f"up{level}")(x)
      else:
        x = _upsample_fixed(x, self.upsample)
      first = self._conv(channels[level], f"dec{level}_conv0")(x)
      x = self._block(skips[level], channels[level], f"dec{level}", first=first, condition=condition)
    return nn.Conv(self.out_channels, (1, 1, 1), name="head", dtype=jnp.float32,
                   bias_init=nn.initializers.constant(self.head_bias_init))(x.astype(jnp.float32))
