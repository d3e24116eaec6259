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

from locnet_jax.model import losses

TrainState = train_state.TrainState


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(peak: float, *, schedule: str = "constant", total_steps: int = 1, warmup_steps: int = 0):
  """Adam's learning rate: `peak` throughout ("constant", the paper's), or "cosine", from `peak` down to 0
  over `total_steps` (fine-tuning, where a constant rate kept the validation error swinging: measured in
  docs/results.md). Each schedule has its own optimiser-state structure.

  `warmup_steps` (cosine only) first rises linearly from 0 to `peak` within the `total_steps`: a run
  continued from an exported model starts Adam afresh, whose first updates are `peak`-sized for every
  parameter whatever its gradient (a rise of the validation error measured in docs/results.md)."""
  if schedule == "constant":
    if warmup_steps:
      raise ValueError("train.warmup_epochs needs train.lr_schedule='cosine'")
    return peak
  if schedule == "cosine":
    total = max(int(total_steps), 1)
    if not warmup_steps:
      return optax.cosine_decay_schedule(peak, decay_steps=total)
    if not 0 < warmup_steps < total:
      raise ValueError(f"warmup_steps must lie in (0, total_steps={total}), got {warmup_steps}")
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=int(warmup_steps), decay_steps=total)
  raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def create_train_state(model: nn.Module, *, key: jax.Array, volumes, affines,
                       learning_rate) -> TrainState:
  """Initialises `model` on example inputs (shapes only matter) with Optax Adam at `learning_rate` (a
  float or an Optax schedule of the step: `learning_rate()` above)."""
  params = model.init(key, volumes, affines)["params"]
  return TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(learning_rate))


def loss_and_metrics(params, batch: dict[str, Any], *, apply_fn, weights: jax.Array,
                     noise_key: jax.Array | None,
                     presence_weight: float = 1.0,
                     patch_half_mm=None, shift_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of per-scale mean squared errors (mm^2) of the landmarks in the image, with per-scale
  metrics; plus, where the batch has landmarks cut away by a field-of-view crop (``present`` 0 with a
  position), the coarsest scale's `losses.cut_away_loss` (the finer scales' patches around such a point
  hold no image to learn from); for a model with a presence output, plus `presence_weight` x the presence
  cross-entropy (`losses.presence_loss`).

  `patch_half_mm` (S,) mm, when given: a scale's squared error counts only for the landmarks inside its
  input patch (`losses.in_patch`; the half-widths per world axis, inf for the whole-volume coarsest scale):
  a patch that misses a landmark has nothing to learn it from (config `train.loss_in_patch_only`).
  `shift_key`: the intermediate scales' training shifts (`MultiScaleLocNet.train_shift_mm`); None: none."""
  extra = {} if shift_key is None else {"shift_key": shift_key}
  out = apply_fn({"params": params}, batch["volumes"], batch["affines"], noise_key=noise_key, **extra)
  target, present = batch["target_mm"], batch.get("present")
  cut = None
  if present is not None:
    cut = (present == 0) & losses.landmark_mask(target)
    target = jnp.where(cut[..., None], jnp.nan, target)  # in the image only
  inside = None if patch_half_mm is None else losses.in_patch(target, out["center_mm"], patch_half_mm)  # (B, S, K)
  per_scale = losses.per_scale_loss(out["pred_mm"], target, only=inside)
  error_mm = jnp.sqrt(losses.squared_error_mm(out["pred_mm"], target[:, None]))  # (B, S, K)
  count = jnp.maximum(jnp.sum(losses.landmark_mask(target)), 1)
  mean_error_mm = jnp.sum(error_mm, axis=(0, 2)) / count  # missing landmarks have error 0
  loss = losses.weighted_loss(per_scale, weights)
  metrics = {"per_scale_mse_mm2": per_scale, "per_scale_error_mm": mean_error_mm}
  if cut is not None:
    metrics["cut_away_loss_mm"] = losses.cut_away_loss(out["pred_mm"][:, 0], batch["target_mm"], cut)
    loss = loss + metrics["cut_away_loss_mm"]
  if "presence_logit" in out:
    present = batch.get("present")
    if present is None:  # every annotated landmark is in the image
      present = jnp.where(losses.landmark_mask(batch["target_mm"]), 1.0, jnp.nan)
    metrics["presence_bce"] = losses.presence_loss(out["presence_logit"], present)
    loss = loss + presence_weight * metrics["presence_bce"]
  return loss, {"loss": loss, **metrics}


def freeze_scales(tree: dict, trainable: jax.Array) -> dict:
  """Multiplies the subtree of every Loc-Net ``scale{s}`` by ``trainable[s]`` (0: frozen); others unchanged."""
  return {name: (jax.tree.map(lambda x, s=int(name[5:]): x * trainable[s].astype(x.dtype), sub)
                 if name.startswith("scale") else sub) for name, sub in tree.items()}


def _apply(state: TrainState, grads, trainable: jax.Array | None) -> TrainState:
  if trainable is None:
    return state.apply_gradients(grads=grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  updates = freeze_scales(updates, trainable)  # frozen scales keep their parameters exactly
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


def _health(metrics: dict, grads, params) -> dict:
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["param_norm"] = optax.tree.norm(params)
  return metrics


def train_step(state: TrainState, batch: dict[str, Any], key: jax.Array | None, *, weights: jax.Array,
               trainable: jax.Array | None = None, presence_weight: float = 1.0, patch_half_mm=None,
               shift_root: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step of a Loc-Net model; `key` drives noise injection before the finest crop (None: no noise);
  `shift_root`, when given, the intermediate scales' training shifts, keyed ``fold_in(shift_root, step)``.

  `weights` (S,) are the per-scale loss weights; `trainable` (S,) 0/1, when given, freezes the scales
  marked 0 (the multi-step baseline trains one scale at a time); `patch_half_mm` as in `loss_and_metrics`. Returns the new state and metrics: loss,
  per-scale MSE and mean error (mm), gradient and parameter global norms (health checks).
  """
  grad_fn = jax.grad(functools.partial(loss_and_metrics, apply_fn=state.apply_fn, weights=weights,
                                       noise_key=key, presence_weight=presence_weight,
                                       patch_half_mm=patch_half_mm,
                                       shift_key=None if shift_root is None else jax.random.fold_in(
                                           shift_root, state.step)), has_aux=True)
  grads, metrics = grad_fn(state.params, batch)
  return _apply(state, grads, trainable), _health(metrics, grads, state.params)


def heatmap_loss_and_metrics(params, batch: dict[str, Any], *, apply_fn, sigma_mm: float,
                             peak: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The heatmap U-Net's loss: mean squared error against Gaussian blobs of std `sigma_mm` (paper: 6 mm)
  and height `peak` (the prediction, the arg-max, does not depend on it; the balance of the loss does)."""
  out = apply_fn({"params": params}, batch["volumes"], batch["affines"])
  heatmap, target_mm = out["heatmap"], batch["target_mm"]
  affine = jnp.broadcast_to(jnp.asarray(batch["affines"][0], jnp.float32), (heatmap.shape[0], 4, 4))
  targets = peak * jax.vmap(lambda t, a: losses.heatmap_targets(t, a, shape=heatmap.shape[1:4], sigma_mm=sigma_mm))(
      target_mm, affine)
  loss = losses.heatmap_l2_loss(heatmap, targets, losses.landmark_mask(target_mm))
  error_mm = jnp.sqrt(losses.squared_error_mm(out["pred_mm"], target_mm[:, None]))  # (B, 1, K)
  count = jnp.maximum(jnp.sum(losses.landmark_mask(target_mm)), 1)
  return loss, {"loss": loss, "per_scale_error_mm": jnp.sum(error_mm, axis=(0, 2)) / count}


def heatmap_train_step(state: TrainState, batch: dict[str, Any], key: jax.Array | None = None, *,
                       sigma_mm: float, peak: float = 1.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step of the heatmap U-Net baseline (`key` unused: no noise injection)."""
  del key
  grad_fn = jax.grad(functools.partial(heatmap_loss_and_metrics, apply_fn=state.apply_fn, sigma_mm=sigma_mm,
                                       peak=peak), has_aux=True)
  grads, metrics = grad_fn(state.params, batch)
  return state.apply_gradients(grads=grads), _health(metrics, grads, state.params)
