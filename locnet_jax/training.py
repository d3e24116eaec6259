"""One optimisation step of a Loc-Net model: pure functions, jitted by the caller.

A batch is a dict ``{"volumes": [S x (B, X_s, Y_s, Z_s)], "affines": [S x (B, 4, 4)], "target_mm":
(B, K, 3)}`` (RAS mm, NaN rows for missing landmarks). The per-scale loss weights come in as an array,
so changing them every epoch does not recompile the step.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from locnet_jax import losses

TrainState = train_state.TrainState


def create_train_state(model: nn.Module, *, key: jax.Array, volumes, affines,
                       learning_rate: float) -> TrainState:
  """Initialises `model` on example inputs (shapes only matter) with Optax Adam at `learning_rate`."""
  params = model.init(key, volumes, affines)["params"]
  return TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(learning_rate))


def loss_and_metrics(params, batch: dict[str, Any], *, apply_fn, weights: jax.Array,
                     noise_key: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of per-scale mean squared errors (mm^2), with per-scale metrics."""
  out = apply_fn({"params": params}, batch["volumes"], batch["affines"], noise_key=noise_key)
  per_scale = losses.per_scale_loss(out["pred_mm"], batch["target_mm"])
  error_mm = jnp.sqrt(losses.squared_error_mm(out["pred_mm"], batch["target_mm"][:, None]))  # (B, S, K)
  count = jnp.maximum(jnp.sum(losses.landmark_mask(batch["target_mm"])), 1)
  mean_error_mm = jnp.sum(error_mm, axis=(0, 2)) / count  # missing landmarks have error 0
  loss = losses.weighted_loss(per_scale, weights)
  return loss, {"loss": loss, "per_scale_mse_mm2": per_scale, "per_scale_error_mm": mean_error_mm}


def train_step(state: TrainState, batch: dict[str, Any], key: jax.Array | None, *,
               weights: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step; `key` drives noise injection before the finest crop (None: no noise).

  Returns the new state and metrics: loss, per-scale MSE and mean error (mm), gradient and parameter
  global norms (health checks).
  """
  grad_fn = jax.grad(functools.partial(loss_and_metrics, apply_fn=state.apply_fn, weights=weights,
                                       noise_key=key), has_aux=True)
  grads, metrics = grad_fn(state.params, batch)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["param_norm"] = optax.tree.norm(state.params)
  return state.apply_gradients(grads=grads), metrics
