"""The AFIDs benchmark builder: images and landmarks moved by the same transform, from folder and wheel."""

import json
import zipfile

import numpy as np
import pytest
import scipy.ndimage

from locnet_jax import dataset, geometry, io
from locnet_jax.data import afids

pytestmark = pytest.mark.xdist_group("afids_built")  # its tests share an expensive fixture: one worker builds it once

LANDMARKS = ("AC", "PC", "GENU", "SPLE", "RLVAC", "LOSF")


def _neighbourhood(volume, center_mm, axes_mm, radius=4):
  """Image values at center + axes @ u for u on a (2r+1)^3 grid of 1 mm steps."""
  u = np.stack(np.meshgrid(*[np.arange(-radius, radius + 1)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(float)
  points = center_mm + u @ axes_mm.T
  vox = geometry.mm_to_vox(points, volume.affine)
  return scipy.ndimage.map_coordinates(volume.data, vox.T, order=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, afids_source):
  out = tmp_path_factory.mktemp("afids")
  manifest = afids.build(out, num_train=2, num_val=0, num_test=1, seed=3, landmarks=LANDMARKS, elastic=False,
                         workers=2, source=afids_source, log=lambda *_: None)
  return out, manifest


def test_the_data_set_is_the_same_for_any_worker_count(built, tmp_path):
  out, manifest_path = built  # written by 2 worker processes
  serial = afids.build(tmp_path, num_train=2, num_val=0, num_test=1, seed=3, landmarks=LANDMARKS, elastic=False,
                       workers=0, log=lambda *_: None)
  assert serial.read_text() == manifest_path.read_text()
  assert (tmp_path / "build_info.json").read_text() == (out / "build_info.json").read_text()
  for a, b in zip(dataset.load_manifest(manifest_path).cases, dataset.load_manifest(serial).cases):
    np.testing.assert_array_equal(io.load_volume(a.image).data, io.load_volume(b.image).data)
    np.testing.assert_array_equal(io.load_landmarks(a.landmarks, LANDMARKS), io.load_landmarks(b.landmarks, LANDMARKS))


def test_image_and_landmarks_are_moved_by_the_same_transform(built, afids_source):
  out, manifest_path = built
  manifest = dataset.load_manifest(manifest_path)
  info = json.loads((out / "build_info.json").read_text())
  files = afids.read_source_files(source=afids_source)
  template = afids.load_template(files["T1w"])
  original = afids.parse_afids(files["afids"])[[afids.AFID_NAMES.index(n) for n in LANDMARKS]]
  assert manifest.landmarks == LANDMARKS and len(manifest.cases) == 3
  for case, case_info in zip(manifest.cases, info["cases"]):
    volume = io.load_volume(case.image)  # through the files, as a user would read them
    moved = io.load_landmarks(case.landmarks, LANDMARKS)
    linear = np.asarray(case_info["transform_world"])[:3, :3]
    np.testing.assert_allclose(moved, geometry.apply_affine(np.asarray(case_info["transform_world"]), original),
                               atol=1e-4)
    for k in range(len(LANDMARKS)):
      reference = _neighbourhood(template, original[k], np.eye(3))
      here = _neighbourhood(volume, moved[k], linear)
      off = _neighbourhood(volume, moved[k] + linear @ np.array([4.0, -3.0, 3.0]), linear)
      r_here, r_off = np.corrcoef(reference, here)[0, 1], np.corrcoef(reference, off)[0, 1]
      assert r_here > 0.9 and r_here > r_off + 0.2, (case.id, LANDMARKS[k], r_here, r_off)


def test_cases_differ_and_are_stored_in_varied_orientations_and_formats(built):
  out, manifest_path = built
  manifest = dataset.load_manifest(manifest_path)
  suffixes = {c.landmarks.name.split(".", 1)[1] for c in manifest.cases}
  assert suffixes == {"mrk.json", "fcsv"}
  assert "LPS" in (out / "landmarks" / "case000.mrk.json").read_text()
  points = [io.load_landmarks(c.landmarks, LANDMARKS) for c in manifest.cases]
  assert np.linalg.norm(points[0] - points[1], axis=-1).min() > 1.0
  info = json.loads((out / "build_info.json").read_text())
  assert info["constant_baseline_test"]["mean_mm"] > 0 and set(info["constant_baseline_test"]["per_landmark_mean_mm"]) == set(LANDMARKS)
  for case in manifest.cases:
    volume = io.load_volume(case.image)
    io.check_landmarks_in_image(io.load_landmarks(case.landmarks, LANDMARKS), LANDMARKS, volume, case.image)


def test_same_seed_same_case_and_elastic_points_follow_the_warp(afids_source):
  files = afids.read_source_files(source=afids_source)
  template = afids.load_template(files["T1w"])
  original = afids.parse_afids(files["afids"])[:4]
  a = afids.make_case(template, original, np.random.default_rng(5), elastic=True, intensity=False)
  b = afids.make_case(template, original, np.random.default_rng(5), elastic=True, intensity=False)
  np.testing.assert_array_equal(a["data"], b["data"])
  np.testing.assert_array_equal(a["points_mm"], b["points_mm"])
  # the moved points map back onto the originals through the warp the image was sampled with
  rng = np.random.default_rng(5)
  transform = afids.random_affine_transform(rng)
  assert np.allclose(transform, a["transform"])
  volume = io.Volume(a["data"], a["affine"])
  for k in range(4):
    ref = _neighbourhood(template, original[k], np.eye(3), radius=3)
    here = _neighbourhood(volume, a["points_mm"][k], transform[:3, :3], radius=3)
    assert np.corrcoef(ref, here)[0, 1] > 0.85


def test_reoriented_grid_keeps_the_field_of_view():
  affine = np.diag([1.0, 1.0, 1.0, 1.0])
  affine[:3, 3] = [-96.0, -132.0, -78.0]
  shape = (193, 229, 193)
  corners = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")).reshape(3, -1).T
  for name in afids.ORIENTATIONS:
    new_affine, new_shape = afids.reoriented_grid(affine, shape, name)
    world = lambda a, s: np.sort(geometry.vox_to_mm(corners * (np.asarray(s) - 1), a), axis=0)  # noqa: E731
    np.testing.assert_allclose(world(new_affine, new_shape), world(affine, shape))
  lps, _ = afids.reoriented_grid(affine, shape, "LPS")
  assert np.allclose(np.diag(lps)[:3], [-1, -1, 1])


def test_wheel_files_are_read_and_md5_checked(tmp_path, afids_source):
  wheel = tmp_path / "autoafids-0.1.4-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    for role in ("T1w", "afids"):
      z.write(afids_source / afids.FILES[role][0], afids.WHEEL[2] + afids.FILES[role][0])
  files = afids.read_wheel(wheel)
  assert afids.parse_afids(files["afids"]).shape == (32, 3)
  bad = tmp_path / "bad.whl"
  with zipfile.ZipFile(bad, "w") as z:
    z.writestr(afids.WHEEL[2] + afids.FILES["T1w"][0], b"not the template")
    z.write(afids_source / afids.FILES["afids"][0], afids.WHEEL[2] + afids.FILES["afids"][0])
  with pytest.raises(io.DataError, match="md5"):
    afids.read_wheel(bad)
  with pytest.raises(io.DataError, match="missing AFIDs source file"):
    afids.read_source_files(source=tmp_path)


def test_builder_runs_from_the_real_pypi_wheel(tmp_path):
  """Downloads autoafids==0.1.4 (27 MB) from the package registry, as a user without ../shared would."""
  manifest = afids.build(tmp_path / "set", num_train=1, num_val=0, num_test=1, seed=0, landmarks=("AC", "PC"),
                         source="wheel", cache_dir=tmp_path / "cache", log=lambda *_: None)
  assert len(list((tmp_path / "cache").glob("autoafids-0.1.4-*.whl"))) == 1
  assert dataset.load_manifest(manifest).landmarks == ("AC", "PC")


@pytest.mark.parametrize("kwargs, message", [
    (dict(landmarks=("AC", "XYZ")), "unknown AFIDs"),
    (dict(modality="T3w"), "modality"),
    (dict(num_test=0), "at least one"),
])
def test_builder_bad_arguments(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    afids.build(tmp_path, **kwargs)


def test_cli_reports_bad_source_in_one_line(tmp_path, capsys):
  assert afids.main(["--out", str(tmp_path / "o"), "--source", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "missing AFIDs source file" in err and "\n" not in err


def test_rater_errors_move_with_each_case_and_match_the_published_range(built):
  out, _ = built
  errors = afids.rater_errors(out, split="train")  # the shipped raters' files
  info = json.loads((out / "build_info.json").read_text())
  assert sorted(errors) == ["rater01", "rater02", "rater03", "rater04"]
  index = [afids.AFID_NAMES.index(n) for n in LANDMARKS]
  consensus = afids.parse_afids((afids.RESOURCES / afids.FILES["afids"][0]).read_bytes())[index]
  rater = afids.parse_afids(next((afids.RESOURCES / "raters").glob("*rater01*")).read_bytes())[index]
  train = [np.asarray(c["transform_world"]) for c in info["cases"] if c["split"] == "train"]
  assert errors["rater01"].shape == (len(train), len(LANDMARKS))
  linear = train[0][:3, :3]  # a translation cancels, the rotation-scale part does not
  np.testing.assert_allclose(errors["rater01"][0], np.linalg.norm((rater - consensus) @ linear.T, axis=-1), atol=1e-6)
  assert not np.allclose(errors["rater01"][0], np.linalg.norm(rater - consensus, axis=-1))  # scaled by the case
  assert 0.2 < np.mean([e.mean() for e in errors.values()]) < 3.0


def test_local_contrast_sees_an_edge_and_not_a_flat_region_on_an_oblique_anisotropic_grid():
  # a half-space edge x_mm = 0 in a volume stored with flipped, anisotropic, oblique axes
  from scipy.spatial.transform import Rotation
  affine = np.eye(4)
  affine[:3, :3] = Rotation.from_euler("xyz", (10.0, -20.0, 30.0), degrees=True).as_matrix() @ np.diag((-1.0, 0.5, 2.0))
  affine[:3, 3] = (20.0, -15.0, -25.0)
  shape = (48, 80, 32)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
  x_mm = geometry.vox_to_mm(grid, affine)[:, 0].reshape(shape)
  data = np.where(x_mm > 0, 100.0, 20.0)
  center_mm = geometry.vox_to_mm(np.array(shape) / 2 - 0.5, affine)
  on_edge = center_mm * np.array([0.0, 1.0, 1.0])
  flat = on_edge + np.array([-10.0, 0.0, 0.0])  # 10 mm away from the edge: nothing within 5 mm
  contrast = afids.local_contrast(data, affine, np.stack([on_edge, flat]), radius_mm=5.0)
  assert contrast[1] == pytest.approx(0.0, abs=1e-9)
  assert contrast[0] == pytest.approx(0.5 * (100 - 20) / 100, rel=0.1)  # half the ball on each side


def test_landmark_contrast_of_the_template(afids_source):
  contrast = afids.landmark_contrast(("AC", "GENU"), source=afids_source)
  assert sorted(contrast) == ["AC", "GENU"] and all(0.0 < v < 1.0 for v in contrast.values())
