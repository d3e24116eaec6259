"""Scores match landmarks by name, count missing truths, and calibrate the uncertainty."""


import numpy as np
import pytest

from locnet_jax import from_config
from locnet_jax.data import loader
from locnet_jax.eval import metrics, scoring


def _prediction(case_id, mean, std, det):
  return {"case_id": case_id, "pred_mm": np.stack([det + 3.0, det]), "mean_mm": np.asarray(mean, float),
          "std_mm": np.asarray(std, float), "seconds": 0.1}


def test_scores_match_landmarks_by_name_and_count_missing_truths():
  model_names, data_names = ("A", "B", "C"), ("C", "X", "A")
  truth = [np.array([[2.0, 0, 0], [9, 9, 9], [0, 0, 0]]), np.array([[np.nan] * 3, [9, 9, 9], [0, 0, 0]])]
  examples = [loader.Example(f"c{i}", None, t) for i, t in enumerate(truth)]
  mean = np.array([[0.0, 0, 0], [5, 5, 5], [1, 0, 0]])  # A at 0, C at (1, 0, 0)
  std = np.array([[1.0, 1, 1], [1, 1, 1], [0.1, 0.1, 0.1]])
  predictions = [_prediction("c0", mean, std, mean), _prediction("c1", mean + [[0, 0, 3]] * 1, std, mean)]
  results = scoring.score(predictions, examples, model_names=model_names, data_names=data_names)
  assert results["landmarks"] == ["A", "C"] and results["not_scored"] == ["B"]
  # A: truth (0,0,0) vs 0 in c0, 3 in c1; C: truth (2,0,0) -> 1 in c0, missing in c1
  assert results["per_landmark"]["A"]["mean_mm"] == pytest.approx(1.5)
  assert results["per_landmark"]["C"]["count"] == 1 and results["per_landmark"]["C"]["missing"] == 1
  assert results["overall"]["count"] == 3 and results["overall"]["mean_mm"] == pytest.approx((0 + 3 + 1) / 3)
  # coverage: A in c0 (0 < 2.5 mm semi-axis), A in c1 (3 mm off along z, std 1: outside), C in c0 (1 mm, std 0.1: out)
  assert results["uncertainty"]["coverage"] == pytest.approx(1 / 3)
  assert results["per_case"][1]["error_mm"] == [3.0, None]
  assert results["per_scale"][1]["mean_mm"] == pytest.approx((0 + 0 + 1) / 3)  # the deterministic finest pass
  table = scoring.results_markdown(results, title="t")
  assert "| **all landmarks** | 3 | 1.33 ± 1.25 |" in table and "not scored): B" in table
  with pytest.raises(from_config.ConfigError, match="share no name"):
    scoring.score(predictions, examples, model_names=model_names, data_names=("X", "Y", "Z"))
  # calibration fitted on these same cases: z = (0, 3, 10) -> 10 / sqrt(chi2_3(0.9)) covers all three
  scale = scoring.calibration(predictions, examples, model_names=model_names, data_names=data_names)
  assert scale == pytest.approx(10 / np.sqrt(metrics.CHI2_3))
  fitted = {"split": "val", "cases": 2, "scale": scale}
  calibrated = scoring.score(predictions, examples, model_names=model_names, data_names=data_names,
                                calibration=fitted)
  assert calibrated["calibration"] == fitted and calibrated["uncertainty_calibrated"]["coverage"] == pytest.approx(1.0)
  assert calibrated["uncertainty"] == results["uncertainty"]  # the raw figures stay
  assert "Calibrated on the 2 val cases" in scoring.results_markdown(calibrated, title="t")
