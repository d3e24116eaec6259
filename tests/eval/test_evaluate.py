"""evaluate.py, predict.py and export_model.py from the shell on the session's tiny trained run (the slow
tier): results, Slicer files and figures written, bad data sets in one line, exported models exact."""

import json
import subprocess
import sys

import numpy as np
import pytest

from locnet_jax import io, parallel
from tests import helpers

pytestmark = [pytest.mark.slow,  # the end-to-end subprocess tier
              pytest.mark.xdist_group("tiny_run")]  # its tests share an expensive fixture: one worker builds it once


def test_evaluate_and_predict_from_the_shell(tiny_run, tmp_path):
  workdir, manifest, overrides = tiny_run
  done = subprocess.run([sys.executable, "evaluate.py", f"--workdir={workdir}", *overrides], cwd=helpers.ROOT,
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
                        f"--config.data.manifest={manifest.parent / 'other.json'}"], cwd=helpers.ROOT,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ") and "share no name" in bad.stderr
  # predict on that scan as a new one: its deterministic pass gives the evaluation's (up to the float16 cache)
  image = manifest.parent / f"{case['case_id']}.nii.gz"
  done = subprocess.run([sys.executable, "predict.py", f"--workdir={workdir}", f"--image={image}",
                         f"--out={tmp_path / 'pred'}", "--num_noise_samples=0"], cwd=helpers.ROOT, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  predicted = io.load_landmarks(tmp_path / "pred" / f"{case['case_id']}.mrk.json", ["A", "B"])
  np.testing.assert_allclose(predicted, case["deterministic_mm"], atol=0.1)
  missing = subprocess.run([sys.executable, "predict.py", f"--workdir={workdir}", f"--image={tmp_path / 'no.nii.gz'}",
                            f"--out={tmp_path / 'pred'}"], cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
  assert missing.returncode == 2 and "no.nii.gz" in missing.stderr.strip().splitlines()[-1]
  assert (tmp_path / "pred" / f"{case['case_id']}.mrk.json").is_file()  # the earlier output is untouched
  # outputs that would swallow an input or the run: refused before any work, nothing lost
  before = {p: p.read_bytes() for p in [image, *workdir.rglob("*")] if p.is_file()}
  for command in (["predict.py", f"--workdir={workdir}", f"--image={image}", f"--out={image.parent}"],
                  ["predict.py", f"--workdir={workdir}", f"--image={image}", f"--out={image}"],
                  ["evaluate.py", f"--workdir={workdir}", *overrides, f"--config.eval.out_dir={workdir}"],
                  ["evaluate.py", f"--workdir={workdir}", *overrides, f"--config.eval.out_dir={workdir.parent}"]):
    refused = subprocess.run([sys.executable, *command], cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and lines[-1].startswith("error: ") and "Traceback" not in refused.stderr, command
  assert {p: p.read_bytes() for p in [image, *workdir.rglob("*")] if p.is_file()} == before



def test_bad_predict_input_is_one_line_and_loses_nothing(tiny_run, tmp_path):
  workdir, manifest, _ = tiny_run
  image = manifest.parent / "c0.nii.gz"
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  for folder in ("a", "b"):
    (tmp_path / folder / "scan.nii.gz").write_bytes(image.read_bytes())
  bright = np.zeros((24, 24, 24), np.float32)
  bright[3, 3, 3] = 1.0
  io.save_volume(tmp_path / "bright.nii.gz", bright, np.diag([2.0, 2.0, 2.0, 1.0]))
  io.save_volume(tmp_path / "needle.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 4)).astype(np.float32),
                 np.diag([1.0, 1.0, 1000.0, 1.0]))
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  # (flags, message, exit status, error lines): 2 = refused before any image (flags, names, output folder); else the
  # number of images that failed, each on one error line, the others predicted
  cases = [([f"--image={image}", "--num_noise_samples=-5"], "num_noise_samples=-5", 2, 1),
           (["--image="], "no images given", 2, 1),
           ([f"--image={tmp_path / 'a' / 'scan.nii.gz'},{tmp_path / 'b' / 'scan.nii.gz'}"], "has the case id 'scan'", 2, 1),
           (["--shard=2/2", f"--image={image}"], "not i/n", 2, 1),
           ([f"--bids={tmp_path / 'a'}"], "no sub-* folder", 2, 1),
           ([f"--image={tmp_path / 'bright.nii.gz'}"], "cannot normalise its intensities", 1, 1),
           ([f"--image={tmp_path / 'needle.nii.gz'}"], "exceeds 10 mm", 1, 1),
           ([f"--image={tmp_path / 'needle.nii.gz'},{tmp_path / 'bright.nii.gz'}"], "exceeds 10 mm", 2, 2),
           ([f"--image={tmp_path / 'a' / 'scan.nii.gz'}", f"--out={tmp_path / 'a'}"], "holds an input", 2, 1)]
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  for flags, message, status, count in cases:
    out = [] if any(f.startswith("--out=") for f in flags) else [f"--out={tmp_path / 'out'}"]
    done = subprocess.run([sys.executable, "predict.py", f"--workdir={workdir}", *flags, *out], cwd=helpers.ROOT,
                          capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.strip().splitlines() if line.startswith("error: ")]
    assert done.returncode == status and "Traceback" not in done.stderr, (flags, done.stderr[-2000:])
    assert len(errors) == count and message in errors[0], (flags, errors)
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_exported_model_predicts_exactly_as_its_run(tiny_run, tmp_path):
  workdir, manifest, overrides = tiny_run
  done = subprocess.run([sys.executable, "export_model.py", f"--workdir={workdir}", f"--out={tmp_path / 'model'}",
                         *overrides], cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  card = json.loads((tmp_path / "model" / "model.json").read_text())
  assert card["landmarks"] == ["A", "B"] and card["epochs"] == 2 and card["config"]["model"]["patch_size"] == 8
  assert card["trained_on"] == [parallel.host_description()]  # the machine the epochs ran on, from their records
  assert [run["epochs"] for run in card["runs"]] == [2]
  assert card["total_training_seconds"] == card["training_seconds"] > 0
  assert card["training_data"]["manifest"] == str(manifest.resolve()) and card["training_data"]["cases"]["train"] > 0
  assert sum(f.stat().st_size for f in (tmp_path / "model").rglob("*") if f.is_file()) < 2e5  # parameters only
  image = manifest.parent / "c0.nii.gz"
  for source in (workdir, tmp_path / "model"):
    done = subprocess.run([sys.executable, "predict.py", f"--workdir={source}", f"--image={image}",
                           f"--out={tmp_path / source.name}-pred", "--num_noise_samples=3"], cwd=helpers.ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
  np.testing.assert_array_equal(io.load_landmarks(tmp_path / "run-pred" / "c0.csv", ["A", "B"]),
                                io.load_landmarks(tmp_path / "model-pred" / "c0.csv", ["A", "B"]))


