"""Augmentation moves image and landmarks together; the cache is keyed by content and settings; the
loader is deterministic whatever the number of workers."""

import nibabel as nib
import numpy as np
import pytest

from locnet_jax import dataset, geometry, io
from locnet_jax.data import augment_host, loader, preprocess

SETTINGS = loader.PreprocessSettings(spacings_mm=(4.0, 2.0), finest_size=32, intensity="none",
                                       storage_dtype="float32")


def _blob_pyramid(center_mm, sigma_mm=4.0):
  affine = np.diag([1.5, 1.5, 1.5, 1.0])
  affine[:3, 3] = -30
  shape = (40, 40, 40)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
  data = np.exp(-np.sum((geometry.vox_to_mm(grid, affine) - center_mm) ** 2, -1) / (2 * sigma_mm ** 2))
  return preprocess.build_pyramid(data.astype(np.float32), affine, spacings_mm=(4.0, 2.0, 1.0), finest_size=48)


def _com_mm(volume, affine):
  w = np.clip(volume - np.median(volume), 0, None) ** 2
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), -1)
  return geometry.vox_to_mm((grid * w[..., None]).sum((0, 1, 2)) / w.sum(), affine)


@pytest.mark.parametrize("elastic_mm", [0.0, 3.0])
def test_augmentation_moves_image_and_landmarks_together(elastic_mm):
  center = np.array([5.0, -3.0, 4.0])
  pyramid = _blob_pyramid(center)
  settings = augment_host.AugmentSettings(max_rotation_deg=15, max_scale=0.1, max_translation_mm=6, noise_std=0.0,
                                     max_gamma=0.0, max_intensity_scale=0.0, max_intensity_shift=0.0,
                                     elastic_mm=elastic_mm)
  target = np.array([center, [np.nan] * 3])
  moved_pyramid, moved_target, transform = augment_host.augment(pyramid, target, np.random.default_rng(1), settings)
  assert np.linalg.norm(moved_target[0] - center) > 1.0 and np.all(np.isnan(moved_target[1]))
  # a non-affine warp also deforms the blob, which moves its centre of mass a little (most at 4 mm voxels)
  tolerances = (1.0, 1.0, 1.0) if elastic_mm else (0.6, 0.15, 0.1)
  for volume, affine, tol in zip(moved_pyramid.volumes, moved_pyramid.affines, tolerances):
    np.testing.assert_allclose(_com_mm(volume, affine), moved_target[0], atol=tol)
  affine_only = geometry.apply_affine(transform, center)
  if elastic_mm:  # the elastic part moved the landmark beyond the affine transform, and the image with it
    assert np.linalg.norm(moved_target[0] - affine_only) > 0.3
  else:
    np.testing.assert_allclose(moved_target[0], affine_only)


def test_moved_points_map_back_exactly_through_the_elastic_warp():
  rng = np.random.default_rng(4)
  field = augment_host.ElasticField(rng, lower_mm=[-50, -50, -50], upper_mm=[50, 50, 50], max_mm=3.0)
  transform = augment_host.random_transform(rng, augment_host.AugmentSettings(), center_mm=np.zeros(3))
  points = rng.uniform(-30, 30, (6, 3))
  points[2] = np.nan
  moved = augment_host.move_points(points, transform=transform, elastic=field)
  assert np.all(np.isnan(moved[2]))
  ok = np.arange(6) != 2
  np.testing.assert_allclose(augment_host.source_points(transform, field)(moved[ok]), points[ok], atol=1e-6)
  assert np.abs(field(moved[ok])).max() > 0.5  # the field really moved them


def test_augmentation_is_deterministic_per_seed():
  pyramid = _blob_pyramid(np.zeros(3))
  settings = augment_host.AugmentSettings()
  a = augment_host.augment(pyramid, np.zeros((1, 3)), np.random.default_rng((0, 1, 2)), settings)
  b = augment_host.augment(pyramid, np.zeros((1, 3)), np.random.default_rng((0, 1, 2)), settings)
  c = augment_host.augment(pyramid, np.zeros((1, 3)), np.random.default_rng((0, 1, 3)), settings)
  np.testing.assert_array_equal(a[0].volumes[-1], b[0].volumes[-1])
  assert not np.allclose(a[1], c[1])


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
