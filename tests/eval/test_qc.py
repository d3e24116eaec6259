"""QC per landmark: statuses from presence and the calibrated ellipsoid, thresholds fitted on held-out data and
read from the model folder; absent landmarks written without coordinates and read back as missing."""

import json

import numpy as np
import pytest

from locnet_jax import geometry, io
from locnet_jax.data import loader
from locnet_jax.eval import metrics, predict, qc, scoring
from tests import helpers

NAMES = ("AC", "PC", "GENU")
CHECKS = {"absent_below": 0.5, "uncertain_below": 0.9, "calibration_scale": 2.0, "max_radius_mm": 3.0}


def _record(case_id, mean, std, presence):
  mean = np.asarray(mean, float)
  return {"case_id": case_id, "names": NAMES, "pred_mm": np.stack([mean + 1, mean]), "mean_mm": mean,
          "std_mm": None if std is None else np.asarray(std, float),
          "presence": None if presence is None else np.asarray(presence, float), "seconds": 0.1}


def test_statuses_follow_presence_then_the_calibrated_radius():
  # radius = scale x max std x sqrt(chi2_3(0.9)): std 0.5 -> 2.5 mm, std 0.7 -> 3.5 mm (threshold 3 mm)
  std = np.array([[0.1, 0.5, 0.2], [0.7, 0.1, 0.1], [0.1, 0.1, 0.1]]) / np.sqrt(metrics.CHI2_3) * 2.5
  np.testing.assert_allclose(qc.radius_mm(std, 2.0), [2.5, 3.5, 0.5], rtol=1e-12)
  assert qc.statuses(count=3, presence=np.array([0.95, 0.95, 0.95]), radius=qc.radius_mm(std, 2.0), qc=CHECKS) == [
      "ok", "uncertain", "ok"]
  assert qc.statuses(count=3, presence=np.array([0.3, 0.7, 0.99]), radius=None, qc=CHECKS) == ["absent", "uncertain", "ok"]
  assert qc.statuses(count=3, presence=np.array([0.3, 0.7, 0.99]), radius=None, qc=None) == ["ok"] * 3  # no QC: no opinion
  assert qc.annotate(_record("c", np.zeros((3, 3)), None, None), CHECKS)["status"] == ["ok"] * 3  # nothing to judge
  annotated = qc.annotate(_record("c", np.zeros((3, 3)), std, [0.2, 0.95, 0.95]), CHECKS)
  assert annotated["status"] == ["absent", "uncertain", "ok"]
  np.testing.assert_allclose(annotated["std_calibrated_mm"], std * 2.0)


def test_the_radius_threshold_is_a_quantile_of_the_held_out_points_the_model_gets_right():
  rng = np.random.default_rng(0)
  truth = np.zeros((50, 3, 3))
  means = rng.normal(0, 0.3, (50, 3, 3))
  means[:5, 0] += 10.0  # five wrong points, with a huge spread that must not count
  std = rng.uniform(0.1, 0.4, (50, 3, 3))
  std[:5, 0] = 50.0
  records = [_record(f"c{i}", means[i], std[i], None) for i in range(50)]
  fitted = qc.fit(records, truth, model_index=[0, 1, 2], calibration_scale=1.5, split="val")
  good = metrics.radial_errors(means, truth) < qc.GOOD_MM
  expected = np.quantile(qc.radius_mm(std, 1.5)[good], qc.RADIUS_QUANTILE)
  assert fitted["max_radius_mm"] == pytest.approx(expected, abs=1e-4) and fitted["max_radius_mm"] < 5
  assert fitted["calibration_scale"] == 1.5 and fitted["fitted_on"]["split"] == "val"
  assert qc.fit([_record("c", means[0], None, None)], truth[:1], model_index=[0, 1, 2], calibration_scale=None,
                split="val")["max_radius_mm"] is None  # no samples: presence only


def test_an_absent_landmark_is_written_unplaced_and_reads_back_missing(tmp_path):
  mean = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
  record = qc.annotate(_record("scan", mean, np.full((3, 3), 0.1), [0.99, 0.1, 0.6]), CHECKS)
  predict.write_predictions(tmp_path, [record], NAMES)
  doc = json.loads((tmp_path / "scan.mrk.json").read_text())
  points = {p["label"]: p for p in doc["markups"][0]["controlPoints"]}
  assert points["PC"]["positionStatus"] == "undefined" and "position" not in points["PC"]
  assert [points[n]["description"] for n in NAMES] == ["status=ok", "status=absent", "status=uncertain"]
  for path in (tmp_path / "scan.mrk.json", tmp_path / "scan.csv"):
    loaded = io.load_landmarks(path, NAMES)
    np.testing.assert_allclose(loaded[[0, 2]], mean[[0, 2]], atol=1e-9)
    assert np.all(np.isnan(loaded[1])), path
  rows = (tmp_path / "predictions.csv").read_text().splitlines()
  assert rows[0].split(",")[-3:] == ["presence", "status", "seconds"]
  assert rows[2].startswith("scan,PC,,,,") and rows[2].endswith(",0.1,absent,0.1")  # presence 0.1, 0.1 s
  std_x = float(rows[1].split(",")[5])
  assert std_x == pytest.approx(0.2)  # calibrated: 0.1 x 2.0
  assert predict.warnings([record]) == ["warning: scan: uncertain: GENU; absent: PC"]
  assert predict.warnings([qc.annotate(_record("fine", mean, None, [0.99] * 3), CHECKS)]) == []


def test_in_a_partial_image_a_landmark_that_would_be_uncertain_is_absent():
  """A field of view shorter than partial_fov_mm along one voxel axis (a slab) turns `uncertain` into
  `absent`; a whole head, or an unknown field of view, keeps `uncertain`; a confident point stays ok."""
  checks = {**CHECKS, "partial_fov_mm": 96.5}
  std = np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [2.0, 0.1, 0.1]])  # GENU's radius 2 x 2 x 2.5 = 10 mm > 3
  slab = qc.field_of_view_mm((helpers.oblique_affine((10, -20, 30), (1.5, -1.0, 2.0), (5, -8, 12)), (120, 150, 20)))
  np.testing.assert_allclose(slab, [180.0, 150.0, 40.0], rtol=1e-9)  # |spacing| x voxels: 40 mm along z
  head = qc.field_of_view_mm((np.diag([1.0, 1.0, 1.0, 1.0]), (193, 229, 193)))
  presence = np.array([0.99, 0.7, 0.99])  # PC near the edge: uncertain by presence
  annotate = lambda fov: qc.annotate({**_record("c", np.zeros((3, 3)), std, presence), "fov_mm": fov}, checks)
  assert annotate(slab)["status"] == ["ok", "absent", "absent"]
  assert annotate(head)["status"] == ["ok", "uncertain", "uncertain"]
  assert annotate(None)["status"] == ["ok", "uncertain", "uncertain"]
  assert qc.annotate({**_record("c", np.zeros((3, 3)), std, presence), "fov_mm": slab}, CHECKS)["status"] == [
      "ok", "uncertain", "uncertain"]  # a model without the threshold (fitted before it existed)
  assert qc.field_of_view_mm(None) is None


def test_the_partial_threshold_is_half_the_shortest_held_out_field_of_view():
  records = [{**_record(f"c{i}", np.zeros((3, 3)), np.full((3, 3), 0.1), None), "fov_mm": np.array(fov)}
             for i, fov in enumerate([[193.0, 229.0, 193.0], [180.0, 200.0, 170.0]])]
  fitted = qc.fit(records, np.zeros((2, 3, 3)), model_index=[0, 1, 2], calibration_scale=1.0, split="val")
  assert fitted["partial_fov_mm"] == pytest.approx(qc.PARTIAL_FRACTION * 170.0)
  unknown = [{**r, "fov_mm": None} for r in records]
  assert qc.fit(unknown, np.zeros((2, 3, 3)), model_index=[0, 1, 2], calibration_scale=1.0,
                split="val")["partial_fov_mm"] is None


def test_thresholds_are_read_from_an_exported_model_or_a_workdir(tmp_path):
  exported, workdir = tmp_path / "model", tmp_path / "run"
  exported.mkdir()
  workdir.mkdir()
  assert qc.load(exported) is None and qc.load(workdir) is None
  (exported / "model.json").write_text(json.dumps({"landmarks": list(NAMES), "qc": CHECKS}))
  (workdir / qc.QC_FILE).write_text(json.dumps({**CHECKS, "max_radius_mm": 7.0}))
  assert qc.load(exported) == CHECKS
  assert qc.load(workdir)["max_radius_mm"] == 7.0


def test_scoring_counts_flags_and_absent_calls():
  truth = np.array([[0.0, 0, 0], [np.nan] * 3, [0, 0, 0]])
  example = loader.Example("c", None, truth, np.array([1.0, 0.0, 1.0]))  # PC absent from the image
  mean = np.array([[0.5, 0, 0], [9, 9, 9], [5, 0, 0]])  # AC right (0.5 mm), GENU wrong (5 mm)
  std = np.array([[0.1] * 3, [0.1] * 3, [5.0] * 3])  # GENU's wide ellipsoid flags it
  record = qc.annotate(_record("c", mean, std, [0.99, 0.1, 0.95]), CHECKS)
  results = scoring.score([record], [example], model_names=NAMES, data_names=NAMES)
  q = results["qc"]
  assert (q["ok"], q["uncertain"], q["absent"]) == (1, 1, 1)
  assert q["flagged_of_over_3mm"] == 1.0 and q["flagged_of_under_1.5mm"] == 0.0
  assert q["absent_recall"] == 1.0 and q["false_absent_rate"] == 0.0
  assert results["per_case"][0]["status"] == ["ok", "absent", "uncertain"]
  assert "QC: 1 ok, 1 uncertain, 1 absent of 3 points" in scoring.results_markdown(results, title="t")


def test_the_calibration_carried_by_qc_thresholds():
  fitted = {**CHECKS, "fitted_on": {"split": "afids/val", "cases": 8}}
  assert qc.calibration(fitted) == {"split": "afids/val", "cases": 8, "scale": 2.0}
  assert qc.calibration(None) is None and qc.calibration({**fitted, "calibration_scale": None}) is None


def test_presence_reads_the_coarse_prediction_against_the_images_field_of_view():
  """A landmark predicted outside the image's voxel grid is absent, one near its edge uncertain, one deep
  inside ok; the learnt presence, where a model has one, multiplies in; without a grid only it counts."""
  affine = helpers.oblique_affine((10, -20, 30), (1.5, -1.0, 2.0), (5.0, -8.0, 12.0))  # oblique, flipped
  shape = (40, 60, 20)  # 60 x 60 x 40 mm
  spacing = geometry.voxel_spacing_mm(affine)
  coarse_vox = np.array([[19.5, 29.5, 9.5],  # the centre, 20 mm deep
                         [19.5, 29.5, 20.5],  # 1 voxel (2 mm) beyond the last slice along z: cut away
                         [19.5, 29.5, 18.5]])  # half a voxel (1 mm) deep: on the edge
  coarse_mm = geometry.vox_to_mm(coarse_vox, affine)
  pred_mm = np.stack([coarse_mm, coarse_mm + 30.0])  # (S=2, K=3, 3); the finest scale is not the one read
  p = qc.presence(pred_mm, (affine, shape))
  depth = np.array([min(20.0 * spacing[0], 30.0 * spacing[1], 10.0 * spacing[2]), -1.0 * spacing[2], 1.0 * spacing[2]])
  np.testing.assert_allclose(p, 1 / (1 + np.exp(-depth / qc.PRESENCE_SOFTNESS_MM)), rtol=1e-9)
  record = {**_record("c", pred_mm[-1], None, p), "pred_mm": pred_mm}
  assert qc.annotate(record, CHECKS)["status"] == ["ok", "absent", "uncertain"]
  np.testing.assert_allclose(qc.presence(pred_mm, (affine, shape), np.array([0.5, 1.0, 1.0])), p * [0.5, 1, 1])
  assert qc.presence(pred_mm, None) is None
  np.testing.assert_array_equal(qc.presence(pred_mm, None, np.array([0.2, 0.9, 1.0])), [0.2, 0.9, 1.0])
