"""Predictions land on the right spot in 3D Slicer's frames, and an output folder is replaced whole or not at all."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from locnet_jax import geometry, io
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
  params = helpers.identity_locnet_params(2)
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
