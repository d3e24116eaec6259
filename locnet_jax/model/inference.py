"""Inference: the deterministic pass and test-time uncertainty (the paper's 50 noise passes), each one jitted call.

Uncertainty (paper, Sec. 2.3): the coarser scales run once, without noise; the finest Loc-Net then runs
for N shifts U(-r, r) mm per axis of its crop centre, `chunk_size` samples at a time inside one jitted
call (`jax.lax.map`), so memory is bounded by a chunk whatever N is (and within a chunk the patches go
through the U-Net in `model.patch_groups` independent calls). Sample n uses the key
``jax.random.split(key, N)[n]``: it equals `MultiScaleLocNet(...)(..., noise_key=that key)` exactly.
The prediction is the mean of the samples; their per-axis standard deviation (RAS axes) is the
uncertainty.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from locnet_jax.model import locnet


def make_predict(model) -> Callable:
  """Jitted ``(params, volumes, affines) -> pred_mm (B, S, K, 3)``: one deterministic pass of any model."""
  return jax.jit(lambda params, volumes, affines: model.apply({"params": params}, volumes, affines)["pred_mm"])


def make_forward(model) -> Callable:
  """Jitted ``(params, volumes, affines) -> {"pred_mm" (B, S, K, 3), and "presence_logit" (B, K) for a model
  with a presence output}``: one deterministic pass."""
  def run(params, volumes, affines):
    out = model.apply({"params": params}, volumes, affines)
    return {k: out[k] for k in ("pred_mm", "presence_logit") if k in out}
  return jax.jit(run)


def auto_chunk_size(num_samples: int) -> int:
  """Noise samples per chunk when none is given: 1 on a CPU backend (the smallest working set stays in
  cache, which measured fastest: docs/performance.md), else min(10, N) (a GPU wants a batch, and all 50
  paper-size samples at once would not fit its memory)."""
  return 1 if jax.default_backend() == "cpu" else min(10, num_samples)


def make_uncertainty(model: locnet.MultiScaleLocNet, *, num_samples: int, chunk_size: int | None) -> Callable:
  """Jitted ``(params, volumes, affines, key) -> dict`` of test-time uncertainty.

  Returns {"pred_mm": (B, S, K, 3) with the finest scale the mean of the samples, "samples_mm": (B, N, K, 3)
  the finest predictions of every sample, "std_mm": (B, K, 3) their per-axis standard deviation,
  "deterministic_mm": (B, K, 3) the finest prediction without noise}; for a model with a presence output,
  "presence_logit" (B, K) of the deterministic pass.
  """
  if not isinstance(model, locnet.MultiScaleLocNet) or model.num_scales < 2:
    raise ValueError("test-time uncertainty needs a multi-scale Loc-Net with >= 2 scales (noise shifts the "
                     "finest crop)")
  if chunk_size is None or chunk_size == 0:
    chunk_size = auto_chunk_size(num_samples)
  if num_samples < 1 or chunk_size < 1:
    raise ValueError(f"num_samples and chunk_size must be >= 1, got {num_samples}, {chunk_size}")
  chunk = min(chunk_size, num_samples)
  num_chunks = -(-num_samples // chunk)
  radius, last = model.noise_mm, model.num_scales - 1
  finest = locnet.scale_net(model, last)  # the model's own finest scale (its U-Net, its landmark conditioning)

  def run(params, volumes, affines, key):
    once = model.apply({"params": params}, volumes, affines)  # no noise
    out = once["pred_mm"]  # (B, S, K, 3)
    center = out[:, last - 1]  # what the finest crop is centred on, before the shift
    batch, k_count = center.shape[:2]
    affine = locnet.batched_affine(affines[last], batch, "finest affine")
    noise = locnet.noise_shifts_mm(key, center.shape, radius_mm=radius, num_samples=num_samples)  # (N, B, K, 3)
    noise = jnp.pad(noise, [(0, num_chunks * chunk - num_samples)] + [(0, 0)] * 3)
    net = functools.partial(finest.apply, {"params": params[f"scale{last}"]})
    offset = locnet.landmark_offset_mm(model, params)[last]  # (K, 3)

    def one_chunk(shifts):  # (C, B, K, 3) -> (B, C, K, 3)
      centers = jnp.moveaxis(center[None] + shifts, 0, 1).reshape(batch, -1, 3)
      pred, _ = locnet.refine(net, volumes[last], affine, centers, num_landmarks=k_count,
                              patch_shape=model.patch_shape, groups=model.patch_groups)
      return pred.reshape(batch, chunk, k_count, 3) + offset

    chunks = jax.lax.map(one_chunk, noise.reshape(num_chunks, chunk, *center.shape))  # (M, B, C, K, 3)
    samples = jnp.moveaxis(chunks, 0, 1).reshape(batch, num_chunks * chunk, k_count, 3)[:, :num_samples]
    mean = jnp.mean(samples, axis=1)
    extra = {"presence_logit": once["presence_logit"]} if "presence_logit" in once else {}
    return {"pred_mm": out.at[:, last].set(mean), "samples_mm": samples, "std_mm": jnp.std(samples, axis=1),
            "deterministic_mm": out[:, last], **extra}

  return jax.jit(run)
