"""Predictions land on the right spot in 3D Slicer's frames, and an output folder is replaced whole or not at all."""

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from locnet_jax import geometry, io, outputs
from locnet_jax.data import loader
from locnet_jax.eval import metrics, predict, restore
from locnet_jax.model.locnet import MultiScaleLocNet
from tests import helpers

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




def test_a_prediction_for_an_lps_stored_oblique_image_reads_back_at_the_truth_in_ras(tmp_path):
  image = _oblique_lps_case(tmp_path)
  settings = loader.PreprocessSettings(spacings_mm=(2.0, 1.0), finest_size=48, intensity="none")
  example = loader.Example("scan", loader.compute_pyramid(image, settings), TRUTH_MM)
  model = MultiScaleLocNet(2, num_scales=2, patch_shape=(16, 16, 16), noise_mm=1.0,
                           unet=dict(depth=0, base_channels=2, norm="none"), patch_groups=1)
  batch = loader.collate([example])
  params = helpers.checked_identity_params(helpers.init(model, jax.random.key(0), batch["volumes"], batch["affines"]),
                                           2)["params"]  # the model's parameter tree, identity values
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
  cells = dict(zip(io.PREDICTION_COLUMNS, rows[1].split(",")))
  assert np.all(std >= 0)
  assert float(cells["confidence_volume_mm3"]) == pytest.approx(metrics.confidence_volume_mm3(std[0]), rel=1e-6)
  assert cells["status"] == "" and cells["presence"] == ""  # not through QC, no image grid, no presence output
  with_grid = dataclasses.replace(example, grid=io.load_grid(image))  # as loaded from a data set or predict.py
  presence = predict.predict_cases(trained, [with_grid], num_samples=6, chunk_size=4, seed=0)[0]["presence"]
  assert presence.shape == (2,) and np.all(presence > 0.99)  # both blobs predicted deep inside the image


def test_an_output_folder_gets_only_its_own_files_and_never_swallows_inputs_or_runs(tmp_path):
  """Writing predictions leaves every other file in the folder byte-identical; a folder that is a file,
  holds an input, or is or holds a model folder is refused before anything is written."""
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  (out / "scan.csv").write_text("old")
  record = {"case_id": "scan", "names": ("AC",), "pred_mm": np.zeros((1, 1, 3)), "mean_mm": None, "std_mm": None,
            "presence": None, "seconds": 0.0}
  predict.write_predictions(outputs.prepare_output_folder(out), [record], ("AC",))
  assert (out / "notes.txt").read_text() == "mine" and (out / "scan.csv").read_text() != "old"
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "predictions.csv", "scan.csv", "scan.mrk.json"]
  image = out / "input.nii.gz"
  image.write_bytes(b"x")
  model = tmp_path / "model"
  model.mkdir()
  (model / "model.json").write_text("{}")
  (model / "params").mkdir()
  refused = [(tmp_path / "file.txt", {}, "is a file"), (out, {"inputs": [image]}, "holds an input"),
             (tmp_path, {"runs": [model]}, "holds the model folder"), (model, {}, "is a training workdir or a model")]
  (tmp_path / "file.txt").write_text("keep")
  for path, checks, message in refused:
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(io.DataError, match=message):
      outputs.prepare_output_folder(path, **checks)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
  assert outputs.check_output_folder(model / "eval", runs=[model]) == (model / "eval").resolve()  # inside: fine
  umask = os.umask(0)
  os.umask(umask)
  fresh = outputs.prepare_output_folder(tmp_path / "fresh" / "deep")
  assert fresh.is_dir() and fresh.stat().st_mode & 0o777 == 0o777 & ~umask  # the usual permissions, not 0700


@pytest.mark.parametrize("bad", ["", " ", "../x", "a/b", "/abs", "a\\b", ".hidden", "..", " lead"])
def test_case_ids_must_be_plain_file_names(bad):
  with pytest.raises(io.DataError, match="case id"):
    outputs.check_case_id(bad, "dataset.json")


def test_image_names_give_case_ids_without_the_nifti_suffix_and_never_collide(tmp_path):
  assert outputs.case_ids_from_paths(["a/1.2.840.113.nii.gz", "b/scan.NII", "c/t1.nii"]) == [
      "1.2.840.113", "scan", "t1"]
  with pytest.raises(io.DataError, match=r"b/scan.nii.gz.*case id 'scan' of a/scan.nii"):
    outputs.case_ids_from_paths(["a/scan.nii", "b/scan.nii.gz"])


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    if os.access(locked, os.W_OK):
      pytest.skip("running as a user who may write anywhere")
    for path in (locked, locked / "new" / "deeper"):
      with pytest.raises(io.DataError, match="cannot be written"):
        outputs.check_output_folder(path)
    assert not (locked / "new").exists()
  finally:
    locked.chmod(0o700)


def test_a_continued_models_card_counts_the_runs_it_continued(tmp_path):
  """`restore.earlier_runs` reads the cards of `train.init_from` in order: a card with `runs` gives them
  all, an older card (no `runs`) counts as one run, a training workdir (no card) as none."""
  chained, old, workdir = tmp_path / "chained", tmp_path / "old", tmp_path / "run"
  for folder in (chained, old, workdir):
    folder.mkdir()
  first = {"workdir": "w1", "epochs": 25, "training_seconds": 4700.0, "trained_on": ["A"], "init_from": None}
  second = {"workdir": "w2", "epochs": 10, "training_seconds": 1900.5, "trained_on": ["B"], "init_from": "x"}
  (chained / "model.json").write_text(json.dumps({"runs": [first, second], "epochs": 10}))
  (old / "model.json").write_text(json.dumps({"checkpoint": "w0/best/9", "epochs": 50, "training_seconds": 812.0,
                                              "trained_on": "cpu"}))
  runs = restore.earlier_runs(f"{old}, {workdir},{chained}")
  assert [r["epochs"] for r in runs] == [50, 25, 10]
  assert sum(r["training_seconds"] for r in runs) == 812.0 + 4700.0 + 1900.5 and runs[0]["workdir"] == "w0/best/9"
  assert restore.earlier_runs("") == []
