"""Fixtures shared by the test folders. Builders they use are in tests/helpers.py.

Every compilation longer than half a second goes to a persistent JAX compilation cache in a temporary
folder of this run, which pytest-xdist's workers (one per core, `-n auto` in pyproject.toml) and the
subprocesses (train.py, predict.py, ...) inherit through the environment: the same tiny model compiled by
ten tests is compiled once. The cache starts
empty every session (what CI measures) and holds executables, not results, so no assertion changes.

Expensive things are made once per session: the tiny trained run every test that needs a trained model
reads (tests write their own outputs under their own tmp_path, never into the run), and the folder of
AFIDs template files (from $LOCNET_AFIDS_SOURCE if set, else extracted from the autoafids wheel, the
way a user's build gets them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# one cache for the whole run: made by the first process (pytest-xdist's controller, or a plain run) and
# inherited by the workers it starts through the environment; removed by its maker at the end
_OWN_CACHE = "LOCNET_TEST_JAX_CACHE" not in os.environ
if _OWN_CACHE:
  os.environ["LOCNET_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="locnet-tests-jax-cache-")
_JAX_CACHE = os.environ["LOCNET_TEST_JAX_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE  # before JAX is imported here or in a subprocess
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# The non-partitionable threefry PRNG: random draws compile about 4x faster on the CPU (a tiny model's jitted
# init: 9.4 s -> 2.5 s on the 2-core Xeon, docs/performance.md, "Test time"); it draws other bits, and no
# test asserts a particular draw (the shipped model's reference values come from its saved parameters).
os.environ["JAX_THREEFRY_PARTITIONABLE"] = "0"
# No LLVM optimisation of the compiled code: tests run tiny arrays, so compiling is their cost, not running
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from locnet_jax.data import afids  # noqa: E402
from tests import helpers  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:  # the controller (or a plain run): after every worker is done
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)


TINY_RUN_OVERRIDES = ["--config=configs/multiscale.py:demo", "--config.data.source=manifest",
                      "--config.data.spacings_mm=(8.0, 4.0)", "--config.data.finest_size=16",
                      "--config.model.patch_size=8", "--config.model.unet.depth=1",
                      "--config.model.unet.base_channels=2", "--config.model.patch_groups=1",
                      "--config.train.num_epochs=2",
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
