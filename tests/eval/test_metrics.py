"""Metrics against hand-computed values; uncertainty in one call equals the loop of single noisy passes."""

import math

import numpy as np
import pytest
import scipy.stats

from locnet_jax.eval import metrics


def test_radial_errors_and_their_summary_by_hand():
  target = np.array([[0.0, 0, 0], [1, 1, 1], [np.nan, np.nan, np.nan], [10, 0, 0], [0, 0, 0]])
  pred = np.array([[3.0, 4, 0], [1, 1, 3], [5, 5, 5], [10, 0, 2.5], [0, 1, 0]])
  errors = metrics.radial_errors(pred, target)
  np.testing.assert_allclose(errors[[0, 1, 3, 4]], [5.0, 2.0, 2.5, 1.0])
  assert np.isnan(errors[2])
  summary = metrics.summarize_errors(errors)
  assert summary["count"] == 4 and summary["missing"] == 1
  assert summary["mean_mm"] == pytest.approx(2.625) and summary["median_mm"] == pytest.approx(2.25)
  assert summary["std_mm"] == pytest.approx(math.sqrt(np.mean((np.array([5, 2, 2.5, 1]) - 2.625) ** 2)))
  assert summary["max_mm"] == 5.0 and summary["p90_mm"] == pytest.approx(2.5 + 0.7 * 2.5)  # linear interpolation
  assert [summary[f"sdr_{r}mm"] for r in ("2", "2.5", "3", "4")] == [0.5, 0.75, 0.75, 0.75]


def test_confidence_ellipsoid_volume_and_coverage_by_hand():
  assert metrics.CHI2_3 == pytest.approx(6.251389, abs=1e-5)
  std = np.array([1.0, 2.0, 0.5])
  expected = 4 / 3 * math.pi * 1.0 * 2.0 * 0.5 * 6.251389 ** 1.5  # 65.47 mm^3
  assert metrics.confidence_volume_mm3(std) == pytest.approx(expected, rel=1e-6)
  assert expected == pytest.approx(65.47, abs=0.01)
  pred = np.zeros(3)
  # on the x semi-axis: sqrt(6.2514) * 1 mm = 2.5003 mm; inside just below, outside just above
  assert metrics.inside_ellipsoid(pred, std, np.array([2.50, 0, 0]))
  assert not metrics.inside_ellipsoid(pred, std, np.array([2.51, 0, 0]))
  assert metrics.inside_ellipsoid(pred, std, np.array([0, 5.0, 0]))  # y semi-axis 5.0006 mm
  assert metrics.inside_ellipsoid(pred, std, np.array([1.5, 3.0, 0.5]))  # 2.25 + 2.25 + 1 = 5.5
  assert not metrics.inside_ellipsoid(pred, std, np.array([1.5, 3.0, 0.75]))  # 2.25 + 2.25 + 2.25 = 6.75
  assert not metrics.inside_ellipsoid(pred, std, np.full(3, np.nan))


def test_a_gaussian_truth_is_covered_90_percent_and_the_correlation_is_scipys():
  rng = np.random.default_rng(0)
  std = rng.uniform(0.2, 3.0, (20000, 3))
  truth = rng.normal(0.0, std)  # the model's Gaussian is exactly right
  inside = metrics.inside_ellipsoid(np.zeros(3), std, truth)
  errors = np.linalg.norm(truth, axis=-1)
  errors[:5] = np.nan
  summary = metrics.summarize_uncertainty(errors, std, inside)
  assert summary["count"] == 19995 and summary["coverage"] == pytest.approx(0.90, abs=0.006)
  volume = metrics.confidence_volume_mm3(std[5:])
  assert summary["pearson_r"] == pytest.approx(scipy.stats.pearsonr(volume, errors[5:]).statistic)
  assert summary["spearman_rho"] == pytest.approx(scipy.stats.spearmanr(volume, errors[5:]).statistic)
  assert summary["pearson_r"] > 0.3 and summary["pearson_p"] < 1e-10  # larger ellipsoids, larger errors
  np.testing.assert_allclose(summary["mean_std_mm"], std[5:].mean(axis=0))


def test_calibration_scale_restores_the_nominal_coverage_of_a_too_confident_model():
  rng = np.random.default_rng(1)
  std = rng.uniform(0.2, 3.0, (20000, 3))
  fit, check = rng.normal(0.0, 2.5 * std), rng.normal(0.0, 2.5 * std)  # truly 2.5x wider than it says
  assert np.mean(metrics.inside_ellipsoid(np.zeros(3), std, check)) < 0.3
  scale = metrics.calibration_scale(np.zeros(3), std, fit)
  assert scale == pytest.approx(2.5, rel=0.03)
  assert np.mean(metrics.inside_ellipsoid(np.zeros(3), std * scale, check)) == pytest.approx(0.90, abs=0.01)
  # by hand: z^2 = (1, 4, 9, 16) -> 9 is the smallest with 75 % at or below it -> c = 3 / sqrt(chi2_3(0.9))
  points = np.array([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0], [4.0, 0, 0], [np.nan, 0, 0]])
  assert metrics.calibration_scale(np.zeros(3), np.ones(3), points, level=0.75) == pytest.approx(
      3 / np.sqrt(metrics.CHI2_3))
  with pytest.raises(ValueError, match="at least one"):
    metrics.calibration_scale(np.zeros(3), np.ones(3), np.full((2, 3), np.nan))








