"""Accuracy and uncertainty metrics of landmark predictions (NumPy; RAS mm).

Radial error: Euclidean distance (mm) between prediction and truth. Success detection rate (SDR) at r:
the fraction of annotated landmarks within r mm. Uncertainty: the per-axis standard deviations
(sigma_x, sigma_y, sigma_z along the RAS axes) of the noise samples, read as an uncorrelated Gaussian;
its 90 % confidence ellipsoid has volume ``4/3 pi sigma_x sigma_y sigma_z chi2_3(0.90)^(3/2)`` (paper,
Sec. 3) and holds the truth when ``sum(((truth - mean) / sigma)^2) <= chi2_3(0.90)`` (coverage).
Missing truths (NaN) are excluded from every figure and counted.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats

SDR_RADII_MM = (2.0, 2.5, 3.0, 4.0)
CONFIDENCE = 0.90
CHI2_3 = float(scipy.stats.chi2.ppf(CONFIDENCE, df=3))  # 6.2514


def radial_errors(pred_mm: np.ndarray, target_mm: np.ndarray) -> np.ndarray:
  """(..., K) mm, NaN where the truth is missing. `pred_mm` and `target_mm` are (..., K, 3)."""
  return np.linalg.norm(np.asarray(pred_mm, np.float64) - np.asarray(target_mm, np.float64), axis=-1)


def confidence_volume_mm3(std_mm: np.ndarray) -> np.ndarray:
  """(...,) mm^3: volume of the 90 % ellipsoid of an uncorrelated Gaussian with per-axis std (..., 3)."""
  std_mm = np.asarray(std_mm, np.float64)
  return 4.0 / 3.0 * math.pi * np.prod(std_mm, axis=-1) * CHI2_3 ** 1.5


def inside_ellipsoid(pred_mm: np.ndarray, std_mm: np.ndarray, target_mm: np.ndarray) -> np.ndarray:
  """(...,) bool: the truth lies in the 90 % ellipsoid around the prediction (False where missing)."""
  z2 = np.sum(((np.asarray(target_mm, np.float64) - pred_mm) / np.maximum(std_mm, 1e-12)) ** 2, axis=-1)
  return np.where(np.isfinite(z2), z2 <= CHI2_3, False)


def calibration_scale(pred_mm: np.ndarray, std_mm: np.ndarray, target_mm: np.ndarray, *, level: float = 0.9) -> float:
  """Post-hoc factor c for the per-axis std so that `level` of these truths lie in their 90 % ellipsoids.

  With z^2 = sum(((target - pred) / std)^2) per landmark, c = sqrt(q / chi2_3(0.9)) for q the `level`
  quantile of z^2 (the smallest value with at least `level` of the entries at or below it), so that
  scaling std by c covers at least `level` of these entries.
  Fitted on held-out cases (the validation split), applied to the test split. Args: (..., 3) arrays.
  """
  z2 = np.sum(((np.asarray(target_mm, np.float64) - pred_mm) / np.maximum(std_mm, 1e-12)) ** 2, axis=-1).ravel()
  z2 = z2[np.isfinite(z2)]
  if z2.size == 0:
    raise ValueError("calibration needs at least one annotated landmark")
  return float(math.sqrt(np.quantile(z2, level, method="inverted_cdf") / CHI2_3))


def summarize_errors(errors_mm: np.ndarray) -> dict:
  """Mean, std, median, 90th percentile, max, SDRs and counts of the finite entries of `errors_mm`."""
  errors_mm = np.asarray(errors_mm, np.float64).ravel()
  present = errors_mm[np.isfinite(errors_mm)]
  out = {"count": int(present.size), "missing": int(errors_mm.size - present.size)}
  if present.size == 0:
    return out
  out.update(mean_mm=float(np.mean(present)), std_mm=float(np.std(present)), median_mm=float(np.median(present)),
             p90_mm=float(np.percentile(present, 90)), max_mm=float(np.max(present)))
  for radius in SDR_RADII_MM:
    out[f"sdr_{radius:g}mm"] = float(np.mean(present <= radius))
  return out


def summarize_uncertainty(errors_mm: np.ndarray, std_mm: np.ndarray, inside: np.ndarray) -> dict:
  """Mean per-axis std, confidence volume, its correlation with the error, coverage (annotated entries).

  Args:
    errors_mm: (N,) radial errors, NaN where missing; std_mm: (N, 3); inside: (N,) bool.
  """
  errors_mm, std_mm = np.asarray(errors_mm, np.float64).ravel(), np.asarray(std_mm, np.float64).reshape(-1, 3)
  keep = np.isfinite(errors_mm)
  errors_mm, std_mm, inside = errors_mm[keep], std_mm[keep], np.asarray(inside).ravel()[keep]
  out = {"count": int(keep.sum())}
  if not keep.any():
    return out
  volume = confidence_volume_mm3(std_mm)
  out.update(mean_std_mm=np.mean(std_mm, axis=0).tolist(), mean_volume_mm3=float(np.mean(volume)),
             median_volume_mm3=float(np.median(volume)), coverage=float(np.mean(inside)))
  if keep.sum() >= 3 and np.ptp(volume) > 0 and np.ptp(errors_mm) > 0:
    pearson = scipy.stats.pearsonr(volume, errors_mm)
    spearman = scipy.stats.spearmanr(volume, errors_mm)
    out.update(pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
               spearman_rho=float(spearman.statistic), spearman_p=float(spearman.pvalue))
  return out
