"""Evaluation end to end: predictions land on the right spot in 3D Slicer's frames, scores match by name,
outputs replace each other whole, figures are real PNGs, and evaluate.py / predict.py run from the shell."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from locnet_jax import dataset, from_config, geometry, io
from locnet_jax.data import loader
from locnet_jax.eval import metrics, predict, restore, scoring
from locnet_jax.model.locnet import MultiScaleLocNet

ROOT = Path(__file__).resolve().parents[1]
TRUTH_MM = np.array([[6.3, -4.1, 3.7], [-5.2, 5.5, -2.4]])  # a bright blob (A) and a dark blob (B), RAS mm


def _oblique_lps_case(folder: Path) -> Path:
  """A NIfTI stored LPS-flipped, oblique and anisotropic, with blob A bright and blob B dark."""
  rotation = Rotation.from_euler("xyz", [17, -11, 28], degrees=True).as_matrix()
  affine = np.eye(4)
  affine[:3, :3] = np.diag([-1, -1, 1]) @ rotation @ np.diag([1.1, 0.9, 1.3])  # LPS-flipped
  shape = (40, 44, 34)
  affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)  # centred on the world origin
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
  grid_mm = geometry.vox_to_mm(grid, affine)
  image = sum(a * np.exp(-np.sum((grid_mm - c) ** 2, -1) / (2 * 2.0 ** 2)) for c, a in zip(TRUTH_MM, (1.0, -1.0)))
  io.save_volume(folder / "scan.nii.gz", image.astype(np.float32), affine)
  return folder / "scan.nii.gz"


def _identity_params(num_scales):
  """Depth-0 U-Nets whose heatmap channel 0 is ReLU(image) and channel 1 ReLU(-image): CoM = blob centre."""
  conv0 = np.zeros((3, 3, 3, 1, 2), np.float32)
  conv0[1, 1, 1, 0] = [1.0, -1.0]
  conv1 = np.zeros((3, 3, 3, 2, 2), np.float32)
  conv1[1, 1, 1] = np.eye(2)
  head = np.eye(2, dtype=np.float32).reshape(1, 1, 1, 2, 2)
  scale = {"unet": {"bottom_conv0": {"kernel": conv0, "bias": np.zeros(2, np.float32)},
                    "bottom_conv1": {"kernel": conv1, "bias": np.zeros(2, np.float32)},
                    "head": {"kernel": head, "bias": np.zeros(2, np.float32)}}}
  return jax.tree.map(jnp.asarray, {f"scale{s}": scale for s in range(num_scales)})


def test_a_prediction_for_an_lps_stored_oblique_image_reads_back_at_the_truth_in_ras(tmp_path):
  image = _oblique_lps_case(tmp_path)
  settings = loader.PreprocessSettings(spacings_mm=(2.0, 1.0), finest_size=48, intensity="none")
  example = loader.Example("scan", loader.compute_pyramid(image, settings), TRUTH_MM)
  model = MultiScaleLocNet(2, num_scales=2, patch_shape=(16, 16, 16), noise_mm=1.0,
                           unet=dict(depth=0, base_channels=2, norm="none"))
  params = _identity_params(2)
  model.init(jax.random.key(0), loader.collate([example])["volumes"], loader.collate([example])["affines"])
  trained = restore.Trained(model, params, ("A", "B"), tmp_path, {})
  predictions = predict.predict_cases(trained, [example], num_samples=6, chunk_size=4, seed=0)
  np.testing.assert_allclose(predictions[0]["mean_mm"], TRUTH_MM, atol=0.3)  # the blobs' world centres
  predict.write_predictions(tmp_path / "out", predictions, trained.names)
  stored = json.loads((tmp_path / "out" / "scan.mrk.json").read_text())
  assert stored["markups"][0]["coordinateSystem"] == "LPS"
  np.testing.assert_allclose(stored["markups"][0]["controlPoints"][0]["position"], predictions[0]["mean_mm"][0] * [-1, -1, 1],
                             atol=1e-4)  # really stored in LPS
  for path in ("scan.mrk.json", "scan.csv"):
    back_ras = io.load_landmarks(tmp_path / "out" / path, ["A", "B"])
    np.testing.assert_allclose(back_ras, predictions[0]["mean_mm"], atol=1e-4)
    np.testing.assert_allclose(back_ras, TRUTH_MM, atol=0.3)
  rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
  assert rows[0] == ",".join(io.PREDICTION_COLUMNS) and len(rows) == 3
  std = predictions[0]["std_mm"]
  assert np.all(std >= 0) and float(rows[1].split(",")[-1]) == pytest.approx(metrics.confidence_volume_mm3(std[0]), rel=1e-6)


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


def test_evaluation_may_change_the_compute_dtype_but_not_the_model(tmp_path):
  from configs import multiscale
  trained = multiscale.get_config("synthetic_demo")
  (tmp_path / "config.json").write_text(trained.to_json_best_effort())
  config = multiscale.get_config("synthetic_demo")
  config.model.unet.dtype = "bfloat16"  # same parameters, another compute dtype: allowed
  from_config.check_model_config(config, tmp_path)
  config.model.unet.base_channels += 1
  with pytest.raises(from_config.ConfigError, match=r"another model or pyramid \(model.unet.base_channels"):
    from_config.check_model_config(config, tmp_path)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
  out = tmp_path / "eval"
  predict.replace_folder(out, lambda f: (f / "old.txt").write_text("old"))

  def crash(folder):
    (folder / "new.txt").write_text("half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    predict.replace_folder(out, crash)
  assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
  predict.replace_folder(out, lambda f: (f / "new.txt").write_text("new"))
  assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # nothing old mixed in
  assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temporary folders left


def _tiny_run(tmp_path):
  """A real data set on disk (blobs, LPS-stored), a tiny model trained 2 epochs with train.py."""
  from tests.test_training import _tiny_dataset
  manifest = _tiny_dataset(tmp_path / "data", count=5)
  cases = json.loads(manifest.read_text())
  cases["cases"][-2]["split"], cases["cases"][-1]["split"] = "val", "test"
  manifest.write_text(json.dumps(cases))
  overrides = ["--config=configs/multiscale.py:demo", "--config.data.source=manifest",
               f"--config.data.manifest={manifest}", "--config.data.spacings_mm=(8.0, 4.0)",
               "--config.data.finest_size=16", "--config.model.patch_size=8", "--config.model.unet.depth=1",
               "--config.model.unet.base_channels=2", "--config.train.num_epochs=2", "--config.eval.num_noise_samples=5",
               "--config.eval.chunk_size=2"]
  workdir = tmp_path / "run"
  done = subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", *overrides], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  return workdir, manifest, overrides


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One `_tiny_run` shared by the shell tests (each writes its outputs under its own tmp_path)."""
  return _tiny_run(tmp_path_factory.mktemp("tiny_run"))


def test_evaluate_and_predict_from_the_shell(tiny_run, tmp_path):
  workdir, manifest, overrides = tiny_run
  done = subprocess.run([sys.executable, "evaluate.py", f"--workdir={workdir}", *overrides], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  out = workdir / "eval" / "test"
  results = json.loads((out / "results.json").read_text())
  assert results["overall"]["count"] == 2 and results["num_noise_samples"] == 5 and results["split"] == "test"
  assert "| **all landmarks** | 2 |" in done.stdout and (out / "results.md").read_text() in done.stdout
  case = results["per_case"][0]
  stored = io.load_landmarks(out / "predictions" / f"{case['case_id']}.mrk.json", ["A", "B"])
  np.testing.assert_allclose(stored, case["pred_mm"], atol=1e-3)
  truth = io.load_landmarks(manifest.parent / f"{case['case_id']}.mrk.json", ["A", "B"])
  np.testing.assert_allclose(np.linalg.norm(stored - truth, axis=-1), case["error_mm"], atol=1e-2)
  for name in ("fig3_slices.png", "fig4_errors.png", "fig5_confidence.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
  # another data set whose landmarks share no name with the model's: one clear line
  other = json.loads(manifest.read_text())
  other["landmarks"] = ["X"]
  for case_entry in other["cases"]:
    del case_entry["landmarks"]
  (manifest.parent / "other.json").write_text(json.dumps(other))
  bad = subprocess.run([sys.executable, "evaluate.py", f"--workdir={workdir}", *overrides,
                        f"--config.data.manifest={manifest.parent / 'other.json'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ") and "share no name" in bad.stderr
  # predict on that scan as a new one: its deterministic pass gives the evaluation's (up to the float16 cache)
  image = manifest.parent / f"{case['case_id']}.nii.gz"
  done = subprocess.run([sys.executable, "predict.py", f"--workdir={workdir}", f"--image={image}",
                         f"--out={tmp_path / 'pred'}", "--num_noise_samples=0"], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  predicted = io.load_landmarks(tmp_path / "pred" / f"{case['case_id']}.mrk.json", ["A", "B"])
  np.testing.assert_allclose(predicted, case["deterministic_mm"], atol=0.1)
  missing = subprocess.run([sys.executable, "predict.py", f"--workdir={workdir}", f"--image={tmp_path / 'no.nii.gz'}",
                            f"--out={tmp_path / 'pred'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert missing.returncode == 2 and "no.nii.gz" in missing.stderr.strip().splitlines()[-1]
  assert (tmp_path / "pred" / f"{case['case_id']}.mrk.json").is_file()  # the earlier output is untouched


def test_an_exported_model_predicts_exactly_as_its_run(tiny_run, tmp_path):
  workdir, manifest, overrides = tiny_run
  done = subprocess.run([sys.executable, "export_model.py", f"--workdir={workdir}", f"--out={tmp_path / 'model'}",
                         *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  card = json.loads((tmp_path / "model" / "model.json").read_text())
  assert card["landmarks"] == ["A", "B"] and card["epochs"] == 2 and card["config"]["model"]["patch_size"] == 8
  assert sum(f.stat().st_size for f in (tmp_path / "model").rglob("*") if f.is_file()) < 2e5  # parameters only
  image = manifest.parent / "c0.nii.gz"
  for source in (workdir, tmp_path / "model"):
    done = subprocess.run([sys.executable, "predict.py", f"--workdir={source}", f"--image={image}",
                           f"--out={tmp_path / source.name}-pred", "--num_noise_samples=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
  np.testing.assert_array_equal(io.load_landmarks(tmp_path / "run-pred" / "c0.csv", ["A", "B"]),
                                io.load_landmarks(tmp_path / "model-pred" / "c0.csv", ["A", "B"]))


def test_the_shipped_model_finds_the_afids_on_a_new_warped_brain(tmp_path):
  from locnet_jax.data import afids
  if not afids.DEFAULT_SOURCE.is_dir():
    pytest.skip("../shared/data/afids is not beside this checkout")
  card = json.loads((ROOT / "pretrained" / "afids6" / "model.json").read_text())
  # a case the model never saw: another seed than its data set's
  afids.build(tmp_path / "set", num_train=1, num_val=0, num_test=1, seed=12345, landmarks=tuple(card["landmarks"]),
              workers=0, log=lambda *_: None)
  case = dataset.load_manifest(tmp_path / "set" / "dataset.json").split("test")[0]
  done = subprocess.run([sys.executable, "predict.py", f"--image={case.image}", f"--out={tmp_path / 'pred'}",
                         "--num_noise_samples=10"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  predicted = io.load_landmarks(tmp_path / "pred" / f"{case.id}.mrk.json", card["landmarks"])
  errors = np.linalg.norm(predicted - io.load_landmarks(case.landmarks, card["landmarks"]), axis=-1)
  assert errors.mean() < 1.5 and errors.max() < 4.0, errors  # the model card's test mean: 0.37 mm
