"""The 3-D U-Net: shapes, every option, and up-front argument checks."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locnet_jax.model.unet import CONV_IMPLS, DOWNSAMPLES, NORMS, UPSAMPLES, UNet3D, resolve_conv_impl
from tests import helpers


@pytest.mark.parametrize("downsample, upsample, norm", list(itertools.product(DOWNSAMPLES, UPSAMPLES, NORMS)))
def test_every_option_keeps_the_spatial_shape(downsample, upsample, norm):
  net = UNet3D(out_channels=3, depth=2, base_channels=4, norm=norm, norm_groups=2,
               downsample=downsample, upsample=upsample)
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 4, 1))
  params = helpers.init(net, jax.random.key(1), x)
  y = net.apply(params, x)
  assert y.shape == (2, 8, 12, 4, 3) and np.all(np.isfinite(y))


@pytest.mark.parametrize("depth, base, growth, convs, expected_channels", [
    (0, 8, 2.0, 1, (8,)),
    (2, 16, 2.0, 2, (16, 32, 64)),
    (3, 8, 1.5, 3, (8, 12, 18, 27)),
])
def test_levels_and_parameter_count(depth, base, growth, convs, expected_channels):
  net = UNet3D(out_channels=2, depth=depth, base_channels=base, channel_growth=growth, convs_per_level=convs)
  assert net.level_channels == expected_channels
  params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1,) + (2 ** depth,) * 3 + (1,)))["params"]
  c, k = expected_channels, 27
  expected = 0
  for level, ch in enumerate(c):  # encoder and bottom blocks
    cin = 1 if level == 0 else c[level - 1]
    expected += (k * cin * ch + ch) + (convs - 1) * (k * ch * ch + ch)
  for level in range(depth):  # decoder: conv(up) + conv(skip, no bias), then the rest
    ch = c[level]
    expected += (k * c[level + 1] * ch + ch) + k * ch * ch + (convs - 1) * (k * ch * ch + ch)
  expected += c[0] * 2 + 2  # 1x1x1 head
  assert sum(x.size for x in jax.tree.leaves(params)) == expected


def test_activation_and_head_bias_are_used():
  x = jnp.zeros((1, 4, 4, 4, 1))
  net = UNet3D(out_channels=2, depth=1, base_channels=2, head_bias_init=0.75)
  params = helpers.init(net, jax.random.key(0), x)
  # zero input, zero biases inside: everything is 0 before the head, so the output is its bias
  np.testing.assert_allclose(net.apply(params, x), 0.75)


def test_jit_and_vmap_agree_with_a_batch():
  net = UNet3D(out_channels=1, depth=1, base_channels=4, downsample="max_blur", norm="instance")
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 8, 1))
  params = helpers.init(net, jax.random.key(1), x)
  batched = jax.jit(net.apply)(params, x)
  per_example = jax.vmap(lambda xi: net.apply(params, xi[None])[0])(x)
  helpers.assert_f32_equal(batched, per_example)


@pytest.mark.slow  # many programs to compile: over 25 s on 2 cores
def test_conv_impls_share_parameters_and_compute_the_same_function():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 4, 2))
  nets = {impl: UNet3D(out_channels=3, depth=2, base_channels=4, norm="instance", conv_impl=impl)
          for impl in ("xla", "as_2d")}
  params = helpers.init(nets["xla"], jax.random.key(1), x)
  assert (jax.tree_util.tree_structure(jax.eval_shape(nets["as_2d"].init, jax.random.key(1), x)) ==
          jax.tree_util.tree_structure(params))
  outs = {impl: net.apply(params, x) for impl, net in nets.items()}
  helpers.assert_f32_equal(outs["as_2d"], outs["xla"])
  grads = {impl: jax.grad(lambda p, net=net: jnp.sum(net.apply(p, x) ** 2))(params) for impl, net in nets.items()}
  helpers.assert_f32_equal(grads["as_2d"], grads["xla"])  # to the scale of the whole gradient


@pytest.mark.parametrize("conv_impl", ["xla", "as_2d"])
def test_bfloat16_compute_keeps_float32_parameters_and_heatmaps(conv_impl):
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 1))
  nets = {dtype: UNet3D(out_channels=2, depth=1, base_channels=4, norm="instance", upsample="transpose",
                        conv_impl=conv_impl, dtype=dtype) for dtype in ("float32", "bfloat16")}
  params = helpers.init(nets["float32"], jax.random.key(1), x)
  low_params = helpers.init(nets["bfloat16"], jax.random.key(1), x)
  assert jax.tree_util.tree_structure(low_params) == jax.tree_util.tree_structure(params)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(low_params)} == {jnp.dtype(jnp.float32)}
  full, low = nets["float32"].apply(params, x), nets["bfloat16"].apply(params, x)
  assert low.dtype == jnp.float32
  _, hidden = nets["bfloat16"].apply(params, x, capture_intermediates=lambda m, _: isinstance(m, nn.Conv))
  conv_outs = jax.tree_util.tree_leaves(hidden["intermediates"])
  assert {o.dtype for o in conv_outs} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # body, head
  # bfloat16 keeps 8 bits of mantissa: close to float32 (relative to the output's spread), not equal
  error = float(jnp.max(jnp.abs(low - full)) / jnp.std(full))
  assert 0 < error < 0.2  # measured 0.08; the mm effect on a trained model: docs/results.md


def test_auto_conv_impl_follows_the_backend():
  assert resolve_conv_impl("auto") == ("as_2d" if jax.default_backend() == "cpu" else "xla")
  assert [resolve_conv_impl(i) for i in ("xla", "as_2d")] == ["xla", "as_2d"]
  assert set(CONV_IMPLS) == {"auto", "xla", "as_2d"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(out_channels=0), "out_channels"),
    (dict(out_channels=1, depth=-1), "depth"),
    (dict(out_channels=1, base_channels=0), "base_channels"),
    (dict(out_channels=1, convs_per_level=0), "convs_per_level"),
    (dict(out_channels=1, channel_growth=0), "channel_growth"),
    (dict(out_channels=1, norm="batch"), "norm must be one of"),
    (dict(out_channels=1, activation="tanhh"), "activation must be one of"),
    (dict(out_channels=1, downsample="avg"), "downsample must be one of"),
    (dict(out_channels=1, upsample="cubic"), "upsample must be one of"),
    (dict(out_channels=1, conv_impl="fft"), "conv_impl must be one of"),
    (dict(out_channels=1, dtype="float16"), "dtype must be one of"),
    (dict(out_channels=1, norm="group", base_channels=12, norm_groups=8), "divisible by norm_groups"),
    (dict(out_channels=1, num_conditions=-1), "num_conditions must be an int >= 0"),
])
def test_bad_arguments_fail_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    UNet3D(**kwargs)


@pytest.mark.parametrize("shape, message", [
    ((1, 8, 8, 8), r"\(N, X, Y, Z, C\)"),
    ((1, 8, 6, 8, 1), r"divisible by 2\*\*depth = 4"),
    ((1, 12, 8, 2, 1), r"divisible by 2\*\*depth = 4"),
])
def test_bad_input_shapes(shape, message):
  net = UNet3D(out_channels=1, depth=2, base_channels=2)
  with pytest.raises(ValueError, match=message):
    net.init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("num_conditions, condition, message", [
    (0, jnp.array([0]), "num_conditions=0 called with condition given"),
    (3, None, "num_conditions=3 called with condition None"),
    (3, jnp.array([0, 1]), r"condition must be \(1,\) ints"),
])
def test_a_condition_goes_with_num_conditions(num_conditions, condition, message):
  net = UNet3D(out_channels=1, depth=1, base_channels=2, num_conditions=num_conditions)
  with pytest.raises(ValueError, match=message):
    net.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4, 1)), condition)
