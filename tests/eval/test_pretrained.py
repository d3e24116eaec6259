"""The shipped models. pretrained/afids6 still loads and computes what it computed when it was exported:
its predictions on a built AFIDs case equal the recorded ones (tests/eval/afids6_reference.json, made by the
code that trained it) to 1e-4 mm, and from the shell it finds the landmarks of a brain it never saw.
pretrained/afids6_real does too, with its QC: a whole head has no absent landmark, and the same head cut to a
slab reports the landmarks the slab does not hold as absent. pretrained/afids32 (all 32 AFIDs at 1 mm),
predict.py's default, places every landmark of the head near the truth, as its model card says."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from locnet_jax import dataset, from_config, geometry, io
from locnet_jax.data import afids, loader
from locnet_jax.eval import predict, restore
from tests import helpers

pytestmark = pytest.mark.xdist_group("afids6_case")  # its tests share an expensive fixture: one worker builds it once

MODEL = helpers.ROOT / "pretrained" / "afids6"
REAL_MODEL = helpers.ROOT / "pretrained" / "afids6_real"
AFIDS32_MODEL = helpers.ROOT / "pretrained" / "afids32"
REFERENCE = json.loads((Path(__file__).parent / "afids6_reference.json").read_text())


@pytest.fixture(scope="module")
def unseen_case(tmp_path_factory, afids_source):
  """The reference's AFIDs case: another seed than the model's data set, so a brain it never saw. Its
  landmark file holds all 32 AFIDs (the image and the 6 the reference names do not depend on which)."""
  build = REFERENCE["build"]
  out = tmp_path_factory.mktemp("afids6_case")
  afids.build(out, num_train=build["num_train"], num_val=build["num_val"], num_test=build["num_test"],
              seed=build["seed"], landmarks=afids.AFID_NAMES, workers=0, source=afids_source, log=lambda *_: None)
  return dataset.load_manifest(out / "dataset.json").split("test")[0]


def truth_mm_of(case, names) -> np.ndarray:
  """(len(names), 3) RAS mm: these landmarks of the case's file of all 32 (a file is read with all its labels)."""
  every_mm = io.load_landmarks(case.landmarks, afids.AFID_NAMES)
  return every_mm[[afids.AFID_NAMES.index(name) for name in names]]


@pytest.mark.slow  # the shipped model at its size on a built AFIDs case
def test_the_shipped_model_predicts_as_when_it_was_exported(unseen_case):
  config = restore.saved_config(MODEL)
  example = loader.Example(unseen_case.id, loader.compute_pyramid(unseen_case.image,
                                                                  from_config.preprocess_settings(config.data)),
                           np.zeros((0, 3)))
  trained = restore.restore(config, MODEL, example=example)
  assert list(trained.names) == REFERENCE["build"]["landmarks"]
  np.testing.assert_allclose(truth_mm_of(unseen_case, trained.names), REFERENCE["truth_mm"], atol=1e-5)
  det = predict.predict_cases(trained, [example], num_samples=0, chunk_size=0, seed=REFERENCE["seed"])[0]
  np.testing.assert_allclose(det["pred_mm"], REFERENCE["deterministic_mm"], atol=1e-4, rtol=0)  # every scale, mm
  with jax.threefry_partitionable(True):  # JAX's default, which users run and the reference was made with
    noisy = predict.predict_cases(trained, [example], num_samples=REFERENCE["noise_samples"], chunk_size=0,
                                  seed=REFERENCE["seed"])[0]  # (tests/conftest.py turns it off elsewhere)
  np.testing.assert_allclose(noisy["mean_mm"], REFERENCE["mean_mm"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(noisy["std_mm"], REFERENCE["std_mm"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_shipped_model_finds_the_afids_on_a_new_warped_brain(unseen_case, tmp_path):
  """predict.py --workdir=pretrained/afids6; errors near its model card's test mean (0.37 mm)."""
  card = json.loads((MODEL / "model.json").read_text())
  done = subprocess.run([sys.executable, "predict.py", f"--image={unseen_case.image}", f"--out={tmp_path / 'pred'}",
                         f"--workdir={MODEL}", "--num_noise_samples=0"], cwd=helpers.ROOT, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  predicted = io.load_landmarks(tmp_path / "pred" / f"{unseen_case.id}.mrk.json", card["landmarks"])
  errors = np.linalg.norm(predicted - truth_mm_of(unseen_case, card["landmarks"]), axis=-1)
  assert errors.mean() < 1.5 and errors.max() < 4.0, errors
  # the same function from the shell (its deterministic pass: predict.py keys a case's noise by its id)
  np.testing.assert_allclose(predicted, np.asarray(REFERENCE["deterministic_mm"])[-1], atol=1e-3)


@pytest.mark.slow
def test_the_real_scan_model_finds_the_afids_and_reports_what_a_slab_does_not_hold(unseen_case, tmp_path):
  """predict.py --workdir=pretrained/afids6_real. On the whole unseen head every landmark is placed
  (none absent) near the truth; on a coronal 30 mm slab of it around AC, the landmarks more than 25 mm in
  front of or behind AC (PC, SPLE, the ventricles) are reported absent (no coordinates: only a model with QC
  thresholds, which pretrained/afids6 lacks, calls anything absent)."""
  card = json.loads((REAL_MODEL / "model.json").read_text())
  assert card["qc"]["partial_fov_mm"] > 60.0 and card["qc"]["max_radius_mm"] > 0
  names = card["landmarks"]
  truth_mm = truth_mm_of(unseen_case, names)
  image = nib.load(unseen_case.image)
  affine = image.affine
  ac_vox = geometry.mm_to_vox(truth_mm[names.index("AC")], affine)
  spacing = geometry.voxel_spacing_mm(affine)
  axis = int(np.argmax(np.abs(affine[1, :3]) / spacing))  # the voxel axis nearest to A (storage is random)
  step = float(spacing[axis])
  lo = int(round(ac_vox[axis] - 15.0 / step))
  index = [slice(None)] * 3
  index[axis] = slice(lo, lo + int(round(30.0 / step)))
  shift = np.zeros(3)
  shift[axis] = lo
  moved = np.eye(4)
  moved[:3, 3] = shift  # the slab's voxel 0 is the whole image's voxel `lo` along that axis
  slab = nib.Nifti1Image(np.asarray(image.dataobj)[tuple(index)], affine @ moved)
  nib.save(slab, str(tmp_path / "slab.nii.gz"))
  done = subprocess.run([sys.executable, "predict.py", f"--image={unseen_case.image},{tmp_path / 'slab.nii.gz'}",
                         f"--out={tmp_path / 'pred'}", f"--workdir={REAL_MODEL}", "--num_noise_samples=20"],
                        cwd=helpers.ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  whole = io.load_landmarks(tmp_path / "pred" / f"{unseen_case.id}.mrk.json", names)
  assert not np.isnan(whole).any()  # a whole head: nothing absent
  assert np.linalg.norm(whole - truth_mm, axis=-1).mean() < 1.5
  cut = io.load_landmarks(tmp_path / "pred" / "slab.mrk.json", names)
  direction = affine[:3, axis] / step
  far = np.abs((truth_mm - truth_mm[names.index("AC")]) @ direction) > 25.0
  assert far.sum() >= 3 and np.isnan(cut[far]).all(), (far, cut)


@pytest.mark.slow
def test_the_default_model_finds_every_afid_on_a_new_warped_brain(unseen_case, tmp_path):
  """predict.py with no --workdir: pretrained/afids32, the 32 AFIDs at 1 mm on an unseen head, none missing,
  the mean error within its model card's test figures (mean + 2 std: one head is a sample of 32 of its points)."""
  card = json.loads((AFIDS32_MODEL / "model.json").read_text())
  assert card["landmarks"] == list(afids.AFID_NAMES) and card["config"]["data"]["spacings_mm"][-1] == 1.0
  done = subprocess.run([sys.executable, "predict.py", f"--image={unseen_case.image}", f"--out={tmp_path / 'pred'}",
                         "--num_noise_samples=0"], cwd=helpers.ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  predicted = io.load_landmarks(tmp_path / "pred" / f"{unseen_case.id}.mrk.json", card["landmarks"])
  errors = np.linalg.norm(predicted - truth_mm_of(unseen_case, card["landmarks"]), axis=-1)
  test = card["test"]["overall"]
  assert errors.mean() < test["mean_mm"] + 2 * test["std_mm"], (errors.mean(), test)
  assert errors.max() < 4 * test["p90_mm"], errors
