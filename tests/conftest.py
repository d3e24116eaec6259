"""Fixtures shared by the test folders. Builders they use are in tests/helpers.py.

Expensive things are made once per session: the tiny trained run every test that needs a trained model
reads (tests write their own outputs under their own tmp_path, never into the run), and the folder of
AFIDs template files (from $LOCNET_AFIDS_SOURCE if set, else extracted from the autoafids wheel, the
way a user's build gets them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from locnet_jax.data import afids
from tests import helpers

TINY_RUN_OVERRIDES = ["--config=configs/multiscale.py:demo", "--config.data.source=manifest",
                      "--config.data.spacings_mm=(8.0, 4.0)", "--config.data.finest_size=16",
                      "--config.model.patch_size=8", "--config.model.unet.depth=1",
                      "--config.model.unet.base_channels=2", "--config.train.num_epochs=2",
                      "--config.eval.num_noise_samples=5", "--config.eval.chunk_size=2"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(workdir, manifest, train.py overrides): a tiny model trained 2 epochs by train.py on a real data set on
  disk (5 blob cases, LPS-stored NIfTI + Slicer files: 3 train, 1 val, 1 test). Read-only for the tests."""
  root = tmp_path_factory.mktemp("tiny_run")
  manifest = helpers.tiny_dataset(root / "data", count=5, splits=["train"] * 3 + ["val", "test"])
  overrides = [*TINY_RUN_OVERRIDES, f"--config.data.manifest={manifest}"]
  workdir = root / "run"
  done = subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", *overrides], cwd=helpers.ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  return workdir, manifest, overrides


@pytest.fixture(scope="session")
def afids_source(tmp_path_factory) -> Path:
  """A folder with the AFIDs template files (T1w, T2w, consensus AFIDs) under their templateflow names."""
  given = os.environ.get(afids.SOURCE_ENV)
  if given:
    return Path(given)
  folder = tmp_path_factory.mktemp("afids_source")
  files = afids.read_source_files(source="wheel", roles=("T1w", "T2w", "afids"))
  for role, data in files.items():
    (folder / afids.FILES[role][0]).write_bytes(data)
  (folder / "roles.json").write_text(json.dumps(sorted(files)))
  return folder
