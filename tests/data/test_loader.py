"""Augmentation moves image and landmarks together; the cache is keyed by content and settings; the
loader is deterministic whatever the number of workers; no shared-memory block outlives a killed run."""

import os
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest

from locnet_jax import dataset, io
from locnet_jax.data import augment_host, loader
from tests import helpers

SETTINGS = loader.PreprocessSettings(spacings_mm=(4.0, 2.0), finest_size=32, intensity="none",
                                       storage_dtype="float32")


AXIS_ALIGNED = helpers.affine([1.5] * 3, [-30.0] * 3)  # 40^3 voxels of 1.5 mm around the origin


def _blob_pyramid(center_mm):
  return helpers.blob_pyramid(center_mm, affine_=AXIS_ALIGNED, spacings_mm=(4.0, 2.0, 1.0), finest_size=48)


def _image(path, seed=0, shift=0.0):
  rng = np.random.default_rng(seed)
  image = nib.Nifti1Image(rng.normal(size=(20, 22, 18)).astype(np.float32) + shift, np.diag([1.5, 1.5, 2.0, 1.0]))
  nib.save(image, str(path))
  return path


def test_cache_is_written_once_then_read_and_invalidated_by_content_and_settings(tmp_path, monkeypatch):
  image = _image(tmp_path / "a.nii.gz")
  cache = tmp_path / "cache"
  first = loader.load_pyramid(image, SETTINGS, cache)
  assert len(list(cache.glob("a-*.npz"))) == 1
  fresh = loader.compute_pyramid(image, SETTINGS)
  for x, y in zip(first.volumes, fresh.volumes):
    np.testing.assert_array_equal(x, y)
  calls = []
  real = loader.compute_pyramid
  monkeypatch.setattr(loader, "compute_pyramid", lambda *a: calls.append(a) or real(*a))
  again = loader.load_pyramid(image, SETTINGS, cache)
  assert calls == [] and np.array_equal(again.volumes[1], first.volumes[1])
  loader.load_pyramid(image, loader.PreprocessSettings(**{**SETTINGS.__dict__, "finest_size": 16}), cache)
  assert len(calls) == 1 and len(list(cache.glob("a-*.npz"))) == 2
  _image(image, seed=0, shift=1.0)  # same name, new content
  changed = loader.load_pyramid(image, SETTINGS, cache)
  assert len(calls) == 2 and not np.allclose(changed.volumes[1], first.volumes[1])
  assert not list(cache.glob(".*tmp"))


def test_float16_cache_is_close_to_the_computed_pyramid(tmp_path):
  image = _image(tmp_path / "b.nii.gz")
  settings = loader.PreprocessSettings(spacings_mm=(4.0, 2.0), finest_size=32, intensity="mr")
  cached = loader.load_pyramid(image, settings, tmp_path)
  computed = loader.compute_pyramid(image, settings)
  assert cached.volumes[1].dtype == np.float32
  np.testing.assert_allclose(cached.volumes[1], computed.volumes[1], atol=1e-3)


def test_a_marked_outside_is_its_own_cache_entry_and_the_default_keeps_old_keys(tmp_path):
  image = _image(tmp_path / "c.nii.gz")
  settings = loader.PreprocessSettings(spacings_mm=(4.0, 2.0), finest_size=32, intensity="mr")
  marked_settings = loader.PreprocessSettings(**{**settings.__dict__, "outside_value": -1.0})
  plain = loader.load_pyramid(image, settings, tmp_path)
  marked = loader.load_pyramid(image, marked_settings, tmp_path)
  assert len(list(tmp_path.glob("c-*.npz"))) == 2
  fine_plain, fine_marked = plain.volumes[1], marked.volumes[1]  # 64 mm of grid around a ~33 mm image
  assert (fine_marked == -1).mean() > 0.3 and np.all(fine_plain >= 0)
  np.testing.assert_allclose(fine_marked[fine_marked >= 0], fine_plain[fine_marked >= 0], atol=1e-3)
  # the default leaves the key as it was before the field existed: caches of earlier runs stay valid
  import dataclasses
  import hashlib
  import json
  recipe = {k: v for k, v in dataclasses.asdict(settings).items() if k != "outside_value"}
  payload = json.dumps({"image": loader._file_digest(image), "settings": recipe, "version": loader.CACHE_VERSION},
                       sort_keys=True)
  assert loader.cache_key(image, settings) == hashlib.sha256(payload.encode()).hexdigest()[:24]
  assert loader.cache_key(image, marked_settings) != loader.cache_key(image, settings)


def test_landmark_outside_its_image_is_reported(tmp_path):
  image = _image(tmp_path / "c.nii.gz")
  io.write_landmarks_csv(tmp_path / "c.csv", ["AC"], np.array([[100.0, 0.0, 0.0]]))
  case = dataset.Case("c", image, tmp_path / "c.csv", "train")
  with pytest.raises(io.DataError, match="c.csv: landmark 'AC' .* outside the image"):
    loader.load_example(case, ["AC"], SETTINGS, None)


def _examples(n=5):
  out = []
  for i in range(n):
    pyramid = _blob_pyramid(np.array([i, -i, 2.0 * i]))
    out.append(loader.Example(f"c{i}", pyramid, np.array([[i, -i, 2.0 * i]], float)))
  return out


def test_loader_is_deterministic_whatever_the_workers():
  examples = _examples()
  settings = augment_host.AugmentSettings()
  with loader.Loader(examples, batch_size=2, seed=7, augment=settings, workers=0) as inline, \
       loader.Loader(examples, batch_size=2, seed=7, augment=settings, workers=1, prefetch=3) as background:
    a, b = list(inline.epoch(3)), list(background.epoch(3))
    other_epoch = list(inline.epoch(4))
  assert len(a) == len(b) == 2
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["target_mm"], y["target_mm"])
    for s in range(3):
      np.testing.assert_array_equal(x["volumes"][s], y["volumes"][s])
  assert a[0]["volumes"][2].shape == (2, 48, 48, 48) and a[0]["affines"][0].shape == (2, 4, 4)
  assert not np.allclose(a[0]["target_mm"], other_epoch[0]["target_mm"])


@pytest.mark.parametrize("what, shape, spacing, message", [
    ("1 x 1 x 1000 mm voxels", (32, 32, 4), (1.0, 1.0, 1000.0), r"voxel spacing \(1.0, 1.0, 1000.0\) mm exceeds 10 mm"),
    ("an 8^3 image of 1 mm voxels", (8, 8, 8), (1.0, 1.0, 1.0), r"covers only \(8.0, 8.0, 8.0\) mm"),
    ("one bright voxel", (24, 24, 24), (2.0, 2.0, 2.0), r"cannot normalise its intensities"),
], ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_images_no_landmark_model_can_read_are_refused_naming_the_file(tmp_path, what, shape, spacing, message):
  data = np.zeros(shape, np.float32)
  data[0, 0, 0] = 1.0  # one bright voxel: every percentile is 0
  if "bright" not in what:
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  path = tmp_path / "scan.nii.gz"
  io.save_volume(path, data, np.diag([*spacing, 1.0]))
  settings = loader.PreprocessSettings(spacings_mm=(8.0, 4.0), finest_size=16)
  with pytest.raises(io.DataError, match=message) as error:
    loader.compute_pyramid(path, settings)
  assert str(path) in str(error.value) and "\n" not in str(error.value)


_KILLED_WHILE_CREATING = textwrap.dedent("""
    import os, signal, sys
    os.ftruncate = lambda *_: os.kill(os.getpid(), signal.SIGKILL)  # dies after the block exists, before it is sized
    if sys.argv[2] == "ours":
        from locnet_jax.data import loader
        loader.create_shared_block(sys.argv[1], size=4096)
    else:
        from multiprocessing import shared_memory
        shared_memory.SharedMemory(create=True, size=4096, name=sys.argv[1])
""")


def _shm_gone(name: str, *, wait_s: float) -> bool:
  deadline = time.time() + wait_s
  while (loader.SHM_DIR / name).exists() and time.time() < deadline:
    time.sleep(0.05)
  return not (loader.SHM_DIR / name).exists()


@pytest.mark.skipif(not loader.SHM_DIR.is_dir(), reason="POSIX shared memory in /dev/shm (Linux)")
def test_a_worker_killed_while_creating_its_block_leaves_nothing_behind():
  """The race CI once hit: SharedMemory registers with the tracker only after creating the block."""
  names = {kind: f"{loader.SHM_PREFIX}test{os.getpid()}_{kind}" for kind in ("stdlib", "ours")}
  try:
    for kind, name in names.items():
      result = subprocess.run([sys.executable, "-c", _KILLED_WHILE_CREATING, name, kind], cwd=helpers.ROOT,
                              capture_output=True, text=True, timeout=120)
      assert result.returncode == -9, result.stderr
    # the control shows the kill lands in the window: the standard library's block outlives its process
    assert (loader.SHM_DIR / names["stdlib"]).exists()
    assert _shm_gone(names["ours"], wait_s=10.0), "a block created by a killed worker was never unlinked"
  finally:
    for name in names.values():
      (loader.SHM_DIR / name).unlink(missing_ok=True)


def test_only_old_blocks_of_runs_that_are_gone_are_swept(tmp_path):
  dead_pid = 9_999_999  # above Linux's largest pid_max (2^22): no such process
  old = time.time() - loader.ORPHAN_AGE_S - 60
  files = {"orphan": f"{loader.SHM_PREFIX}{dead_pid}_aa", "fresh": f"{loader.SHM_PREFIX}{dead_pid}_bb",
           "running": f"{loader.SHM_PREFIX}{os.getpid()}_cc", "not ours": f"other_{dead_pid}_dd"}
  for what, name in files.items():
    (tmp_path / name).write_bytes(b"x" * 1000)
    if what != "fresh":
      os.utime(tmp_path / name, (old, old))
  assert loader.sweep_orphaned_blocks(shm_dir=tmp_path) == 1000
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in files.items() if k != "orphan")
  assert loader.sweep_orphaned_blocks(shm_dir=tmp_path / "missing") == 0
