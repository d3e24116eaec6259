"""The training step learns, and train.py runs end to end on a tiny config."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locnet_jax.data import loader, synthetic
from locnet_jax.model.locnet import MultiScaleLocNet
from locnet_jax.train import steps


def test_training_step_overfits_one_case():
  case = synthetic.make_case(np.random.default_rng(0), spacings_mm=(8.0, 4.0), finest_size=16,
                             num_landmarks=2)
  batch = loader.collate([case])
  model = MultiScaleLocNet(2, num_scales=2, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4), patch_groups=1)
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                      affines=batch["affines"], learning_rate=3e-3)
  step = jax.jit(steps.train_step)
  weights = jnp.array([1.0, 1.0])
  first = None
  for i in range(60):
    state, metrics = step(state, batch, None, weights=weights)
    first = first if first is not None else metrics
  assert state.step == 60
  assert np.all(np.isfinite(metrics["per_scale_error_mm"]))
  assert float(metrics["grad_norm"]) > 0 and float(metrics["param_norm"]) > 0
  # the metrics agree with the model: mean radial error per scale
  pred = state.apply_fn({"params": state.params}, batch["volumes"], batch["affines"])["pred_mm"]
  assert float(metrics["loss"]) < 0.3 * float(first["loss"]), (first["loss"], metrics["loss"])
  assert np.all(np.asarray(metrics["per_scale_error_mm"]) < 0.6 * np.asarray(first["per_scale_error_mm"]))
  assert pred.shape == (1, 2, 2, 3)


def test_training_shifts_are_keyed_by_the_step():
  """`shift_root` shifts the intermediate scale's centre (another loss than without), drawn from
  (root, step): the same state and root give the same step, another step another shift."""
  case = synthetic.make_case(np.random.default_rng(2), spacings_mm=(8.0, 4.0, 2.0), finest_size=32,
                             num_landmarks=2)
  batch = loader.collate([case])
  model = MultiScaleLocNet(2, num_scales=3, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=2),
                           patch_groups=1, train_shift_mm=(12.0,))
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                   affines=batch["affines"], learning_rate=1e-3)
  step = jax.jit(steps.train_step)
  weights, root = jnp.ones(3), jax.random.key(5)
  loss = lambda st, r: float(step(st, batch, None, weights=weights, shift_root=r)[1]["per_scale_mse_mm2"][1])  # noqa: E731
  plain, shifted = loss(state, None), loss(state, root)
  assert shifted != plain and loss(state, root) == shifted
  assert loss(state.replace(step=state.step + 1), root) != shifted


def test_loss_and_metrics_match_a_direct_computation():
  case = synthetic.make_case(np.random.default_rng(1), spacings_mm=(8.0, 4.0), finest_size=16,
                             num_landmarks=3)
  batch = loader.collate([case])
  batch["target_mm"][0, 1] = np.nan
  model = MultiScaleLocNet(3, num_scales=2, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4), patch_groups=1)
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                      affines=batch["affines"], learning_rate=1e-3)
  weights = jnp.array([0.25, 0.75])
  loss, metrics = steps.loss_and_metrics(state.params, batch, apply_fn=state.apply_fn, weights=weights,
                                            noise_key=None)
  pred = np.asarray(model.apply({"params": state.params}, batch["volumes"], batch["affines"])["pred_mm"])
  dist = np.linalg.norm(pred[0] - case.target_mm, axis=-1)[:, [0, 2]]  # (S, present K)
  np.testing.assert_allclose(metrics["per_scale_error_mm"], dist.mean(axis=1), rtol=1e-5)
  np.testing.assert_allclose(loss, np.sum(np.asarray(weights) * (dist ** 2).mean(axis=1)), rtol=1e-5)


























def test_the_cosine_learning_rate_falls_from_its_peak_to_zero_over_the_run():
  rate = steps.learning_rate(4e-4, schedule="cosine", total_steps=100)
  assert float(rate(0)) == pytest.approx(4e-4) and float(rate(50)) == pytest.approx(2e-4, rel=1e-5)
  assert float(rate(100)) == pytest.approx(0.0, abs=1e-12) and float(rate(30)) > float(rate(60))
  assert steps.learning_rate(4e-4) == 4e-4  # the paper's constant rate
  with pytest.raises(ValueError, match="lr_schedule"):
    steps.learning_rate(4e-4, schedule="step")


def test_a_warmed_up_cosine_rises_from_zero_to_its_peak_then_falls_to_zero():
  rate = steps.learning_rate(4e-4, schedule="cosine", total_steps=100, warmup_steps=10)
  assert float(rate(0)) == pytest.approx(0.0, abs=1e-12) and float(rate(5)) == pytest.approx(2e-4)
  assert float(rate(10)) == pytest.approx(4e-4) and float(rate(55)) == pytest.approx(2e-4, rel=1e-5)
  assert float(rate(100)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="warmup"):
    steps.learning_rate(4e-4, warmup_steps=10)  # the constant rate has no warm-up
  with pytest.raises(ValueError, match="warmup_steps must lie in"):
    steps.learning_rate(4e-4, schedule="cosine", total_steps=10, warmup_steps=10)


def test_a_cut_away_landmark_is_trained_at_the_coarsest_scale_only_by_its_radial_error():
  """`present` 0 with a position: out of every scale's squared error, into the coarsest scale's
  `cut_away_loss` (radial mm over the annotated count); a batch without cut-away landmarks is unchanged."""
  pred = jnp.array([[[[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], [[1.0, 0.0, 0.0], [20.0, 0.0, 0.0]]]])  # (1, S=2, K=2, 3)
  target = jnp.array([[[0.0, 3.0, 4.0], [40.0, 0.0, 0.0]]])
  apply_fn = lambda params, volumes, affines, noise_key: {"pred_mm": pred}  # noqa: E731
  weights = jnp.array([1.0, 1.0])
  run = lambda **b: steps.loss_and_metrics({}, {"volumes": [], "affines": [], "target_mm": target, **b},  # noqa: E731
                                           apply_fn=apply_fn, weights=weights, noise_key=None)
  loss_cut, m = run(present=jnp.array([[1.0, 0.0]]))
  np.testing.assert_allclose(m["per_scale_mse_mm2"], [25.0, 1.0 + 9.0 + 16.0])  # landmark 0 only, count 1
  np.testing.assert_allclose(m["cut_away_loss_mm"], 30.0 / 2, rtol=1e-5)  # |10 - 40| over 2 annotated
  np.testing.assert_allclose(loss_cut, 25.0 + 26.0 + 15.0, rtol=1e-5)
  loss_all, m_all = run(present=jnp.array([[1.0, 1.0]]))
  _, m_none = run()
  np.testing.assert_allclose(m_all["per_scale_mse_mm2"], m_none["per_scale_mse_mm2"])
  np.testing.assert_allclose(m_all["per_scale_mse_mm2"], [(25.0 + 900.0) / 2, (26.0 + 400.0) / 2])
  assert float(m_all["cut_away_loss_mm"]) == 0.0 and "cut_away_loss_mm" not in m_none
  np.testing.assert_allclose(loss_all, (25.0 + 900.0) / 2 + (26.0 + 400.0) / 2, rtol=1e-6)


def test_a_finer_scale_learns_only_the_landmarks_inside_its_patch():
  """`patch_half_mm`: a landmark outside a finer scale's input box (around that scale's crop centre, per
  world axis) leaves that scale's squared error; the coarsest scale (inf) keeps every landmark; the
  denominator stays the annotated count. Without it, the paper's loss over every landmark."""
  pred = jnp.array([[[[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], [[1.0, 0.0, 0.0], [20.0, 0.0, 0.0]]]])  # (1, S=2, K=2, 3)
  center = jnp.array([[[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [30.0, 0.0, 5.0]]]])
  target = jnp.array([[[0.0, 3.0, 4.0], [40.0, 0.0, 0.0]]])  # landmark 1: 10 mm off its scale-1 centre in x
  apply_fn = lambda params, volumes, affines, noise_key: {"pred_mm": pred, "center_mm": center}  # noqa: E731
  run = lambda half: steps.loss_and_metrics({}, {"volumes": [], "affines": [], "target_mm": target},  # noqa: E731
                                            apply_fn=apply_fn, weights=jnp.array([1.0, 1.0]), noise_key=None,
                                            patch_half_mm=half)
  _, inside = run((float("inf"), 12.0))  # the box reaches 10 mm in x and 5 mm in z: both in
  _, outside = run((float("inf"), 8.0))  # 10 mm > 8: landmark 1 is out of scale 1's patch
  _, paper = run(None)
  np.testing.assert_allclose(paper["per_scale_mse_mm2"], [(25.0 + 900.0) / 2, (26.0 + 400.0) / 2])
  np.testing.assert_allclose(inside["per_scale_mse_mm2"], paper["per_scale_mse_mm2"])
  np.testing.assert_allclose(outside["per_scale_mse_mm2"], [(25.0 + 900.0) / 2, 26.0 / 2])
  # a box per axis, not a ball: landmark 0 lies 5 mm from its centre but at most 4 mm along any axis
  _, z_out = run((float("inf"), 4.0))
  np.testing.assert_allclose(z_out["per_scale_mse_mm2"], [(25.0 + 900.0) / 2, 26.0 / 2])


def test_the_patch_half_widths_follow_the_pyramid():
  from configs import multiscale
  from locnet_jax.train import loop
  config = multiscale.get_config("afids32")
  assert loop.patch_half_mm(config) == (float("inf"), 48.0, 24.0, 12.0)  # 24^3 patches at 4, 2, 1 mm
