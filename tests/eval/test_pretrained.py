"""The shipped model (pretrained/afids6) still loads and computes what it computed when it was exported:
its predictions on a built AFIDs case equal the recorded ones (tests/eval/afids6_reference.json, made by the
code that trained it) to 1e-4 mm, and from the shell it finds the landmarks of a brain it never saw."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from locnet_jax import dataset, from_config, io
from locnet_jax.data import afids, loader
from locnet_jax.eval import predict, restore
from tests import helpers

pytestmark = pytest.mark.xdist_group("afids6_case")  # its tests share an expensive fixture: one worker builds it once

MODEL = helpers.ROOT / "pretrained" / "afids6"
REFERENCE = json.loads((Path(__file__).parent / "afids6_reference.json").read_text())


@pytest.fixture(scope="module")
def unseen_case(tmp_path_factory, afids_source):
  """The reference's AFIDs case: another seed than the model's data set, so a brain it never saw."""
  build = REFERENCE["build"]
  out = tmp_path_factory.mktemp("afids6_case")
  afids.build(out, num_train=build["num_train"], num_val=build["num_val"], num_test=build["num_test"],
              seed=build["seed"], landmarks=tuple(build["landmarks"]), workers=0, source=afids_source,
              log=lambda *_: None)
  return dataset.load_manifest(out / "dataset.json").split("test")[0]


@pytest.mark.slow  # the shipped model at its size on a built AFIDs case
def test_the_shipped_model_predicts_as_when_it_was_exported(unseen_case):
  config = restore.saved_config(MODEL)
  example = loader.Example(unseen_case.id, loader.compute_pyramid(unseen_case.image,
                                                                  from_config.preprocess_settings(config.data)),
                           np.zeros((0, 3)))
  trained = restore.restore(config, MODEL, example=example)
  assert list(trained.names) == REFERENCE["build"]["landmarks"]
  np.testing.assert_allclose(io.load_landmarks(unseen_case.landmarks, trained.names), REFERENCE["truth_mm"], atol=1e-5)
  det = predict.predict_cases(trained, [example], num_samples=0, chunk_size=0, seed=REFERENCE["seed"])[0]
  np.testing.assert_allclose(det["pred_mm"], REFERENCE["deterministic_mm"], atol=1e-4, rtol=0)  # every scale, mm
  with jax.threefry_partitionable(True):  # JAX's default, which users run and the reference was made with
    noisy = predict.predict_cases(trained, [example], num_samples=REFERENCE["noise_samples"], chunk_size=0,
                                  seed=REFERENCE["seed"])[0]  # (tests/conftest.py turns it off elsewhere)
  np.testing.assert_allclose(noisy["mean_mm"], REFERENCE["mean_mm"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(noisy["std_mm"], REFERENCE["std_mm"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_shipped_model_finds_the_afids_on_a_new_warped_brain(unseen_case, tmp_path):
  """predict.py with no --workdir uses the shipped model; errors near its model card's test mean (0.37 mm)."""
  card = json.loads((MODEL / "model.json").read_text())
  done = subprocess.run([sys.executable, "predict.py", f"--image={unseen_case.image}", f"--out={tmp_path / 'pred'}",
                         "--num_noise_samples=0"], cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  predicted = io.load_landmarks(tmp_path / "pred" / f"{unseen_case.id}.mrk.json", card["landmarks"])
  errors = np.linalg.norm(predicted - io.load_landmarks(unseen_case.landmarks, card["landmarks"]), axis=-1)
  assert errors.mean() < 1.5 and errors.max() < 4.0, errors
  # the same function from the shell (its deterministic pass: predict.py keys a case's noise by its id)
  np.testing.assert_allclose(predicted, np.asarray(REFERENCE["deterministic_mm"])[-1], atol=1e-3)
