"""NIfTI volumes, 3D Slicer landmark files and the manifest: real files written to tmp_path."""

import json

import nibabel as nib
import numpy as np
import pytest

from locnet_jax import dataset, geometry, io
from locnet_jax.data import loader
from tests import helpers

NAMES = ["AC", "PC", "ICS", "RLVAC"]


def _oblique_affine():
  return helpers.oblique_affine((12, -25, 40), (0.8, -1.2, 2.5), (-80.25, 95.5, -40.0), order="xyz")


AFFINES = {
    "RAS": np.diag([1.0, 1.0, 1.0, 1.0]) + np.array([[0, 0, 0, -10], [0, 0, 0, -12], [0, 0, 0, 5], [0, 0, 0, 0]]),
    "LPS": np.array([[-0.9, 0, 0, 20.0], [0, -0.9, 0, 30.0], [0, 0, 1.5, -10.0], [0, 0, 0, 1]]),
    "LAS": np.array([[-1.1, 0, 0, 11.0], [0, 0.7, 0, -9.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]]),
    "permuted": np.array([[0, 0, 1.3, -5.0], [-0.6, 0, 0, 7.0], [0, 2.2, 0, -1.0], [0, 0, 0, 1]]),
    "oblique_flipped_anisotropic": _oblique_affine(),
}


def _save(path, data, affine, *, slope=None, inter=None, qform=True):
  image = nib.Nifti1Image(data, None)
  image.set_sform(affine, code=1)
  if qform:
    image.set_qform(affine, code=1)
  if slope is not None:
    image.header.set_slope_inter(slope, inter)
  nib.save(image, str(path))
  return path


# ---------------------------------------------------------------- volumes

@pytest.mark.parametrize("orientation", AFFINES)
def test_load_volume_keeps_data_and_affine_in_any_orientation(tmp_path, orientation):
  data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
  volume = io.load_volume(_save(tmp_path / "x.nii.gz", data, AFFINES[orientation]))
  np.testing.assert_array_equal(volume.data, data)
  np.testing.assert_allclose(volume.affine, AFFINES[orientation], atol=1e-5)  # sform is stored as float32
  assert volume.data.dtype == np.float32
  np.testing.assert_allclose(volume.spacing_mm, geometry.voxel_spacing_mm(AFFINES[orientation]), rtol=1e-6)


@pytest.mark.parametrize("dtype, slope, inter", [(np.uint8, None, None), (np.int16, 2.5, -1024.0),
                                                 (np.int16, None, None), (np.float64, None, None)])
def test_load_volume_applies_scaling_for_every_stored_dtype(tmp_path, dtype, slope, inter):
  raw = np.arange(4 * 5 * 6).reshape(4, 5, 6).astype(dtype)
  volume = io.load_volume(_save(tmp_path / "x.nii", raw, AFFINES["LAS"], slope=slope, inter=inter))
  expected = raw.astype(np.float64) * (slope or 1.0) + (inter or 0.0)
  np.testing.assert_allclose(volume.data, expected, rtol=1e-6)


@pytest.mark.parametrize("orientation", AFFINES)
def test_load_grid_reads_the_same_affine_and_shape_as_the_volume_without_its_voxels(tmp_path, orientation):
  data = np.random.default_rng(0).normal(size=(6, 7, 8, 1)).astype(np.float32)  # trailing axis dropped too
  path = _save(tmp_path / "x.nii.gz", data, AFFINES[orientation])
  affine, shape = io.load_grid(path)
  volume = io.load_volume(path)
  np.testing.assert_array_equal(affine, volume.affine)
  assert shape == volume.data.shape == (6, 7, 8)
  with pytest.raises(io.DataError, match="expected a 3-D image"):
    io.load_grid(_save(tmp_path / "4d.nii.gz", data.repeat(2, axis=-1), AFFINES[orientation]))  # (6, 7, 8, 2)
  with pytest.raises(io.DataError, match="no such file"):
    io.load_grid(tmp_path / "nope.nii.gz")


def test_trailing_singleton_axes_are_dropped(tmp_path):
  data = np.random.default_rng(1).normal(size=(4, 5, 6, 1)).astype(np.float32)
  assert io.load_volume(_save(tmp_path / "x.nii.gz", data, np.eye(4))).data.shape == (4, 5, 6)


def test_save_volume_round_trips(tmp_path):
  data = np.random.default_rng(2).normal(size=(5, 4, 3)).astype(np.float32)
  for name in ("a.nii", "b.nii.gz"):
    io.save_volume(tmp_path / name, data, AFFINES["oblique_flipped_anisotropic"])
    volume = io.load_volume(tmp_path / name)
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, AFFINES["oblique_flipped_anisotropic"], atol=1e-5)
  assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
  assert (tmp_path / "a.nii").stat().st_mode & 0o044 == 0o044  # readable by others, unlike mkstemp's 0600


def test_voxel_world_round_trip_through_a_stored_oblique_affine(tmp_path):
  volume = io.load_volume(_save(tmp_path / "x.nii.gz", np.random.default_rng(3).normal(size=(9, 9, 9)).astype(
      np.float32), AFFINES["oblique_flipped_anisotropic"]))
  points_vox = np.array([[0.0, 0.0, 0.0], [8.0, 0.5, 3.25], [4.4, 7.9, 1.1]])
  points_mm = geometry.vox_to_mm(points_vox, volume.affine)
  np.testing.assert_allclose(geometry.mm_to_vox(points_mm, volume.affine), points_vox, atol=1e-9)
  # axis 1 is flipped and 1.2 mm long: one voxel step moves 1.2 mm against the rotated y direction
  step = geometry.vox_to_mm(points_vox[0] + [0, 1, 0], volume.affine) - points_mm[0]
  assert np.linalg.norm(step) == pytest.approx(1.2, rel=1e-6)


def test_afids_template_lands_ac_where_its_readme_says(afids_source):
  root = afids_source
  volume = io.load_volume(root / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz")
  points = io.read_fcsv(root / "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv")
  assert volume.data.shape == (193, 229, 193) and len(points) == 32 and points[0][2] == "AC"
  np.testing.assert_allclose(geometry.mm_to_vox(points[0][1], volume.affine), [95.8, 134.7, 73.1], atol=0.05)


# ---------------------------------------------------------------- landmarks

def _points():
  return np.array([[-0.2048614, 2.7228807, -4.8810528], [12.5, -25.04505, -2.2106823],
                   [np.nan] * 3, [-101.25, 77.125, 33.0625]])


@pytest.mark.parametrize("fmt, frame", [(".mrk.json", "RAS"), (".mrk.json", "LPS"), (".fcsv", "RAS"),
                                        (".fcsv", "LPS"), (".csv", "RAS")])
def test_landmarks_round_trip_in_every_format_and_frame(tmp_path, fmt, frame):
  path = tmp_path / f"case{fmt}"
  if fmt == ".mrk.json":
    io.write_mrk_json(path, NAMES, _points(), coordinate_system=frame)
  elif fmt == ".fcsv":
    io.write_fcsv(path, NAMES, _points(), coordinate_system=frame)
  else:
    io.write_landmarks_csv(path, NAMES, _points())
  back = io.load_landmarks(path, NAMES)
  np.testing.assert_allclose(back, _points(), atol=1e-4)
  assert np.all(np.isnan(back[2]))  # missing stays missing, not zero
  if frame == "LPS":  # the file really holds LPS numbers
    raw = path.read_text()
    assert "101.25" in raw and "-101.25" not in raw


def test_mrk_json_frames_and_missing_points_as_slicer_writes_them(tmp_path):
  doc = {"markups": [{"type": "Fiducial", "controlPoints": [  # no coordinateSystem: LPS
      {"label": "AC", "position": [1.0, 2.0, 3.0], "positionStatus": "defined"},
      {"label": "PC", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"},
      {"label": "ICS", "positionStatus": "missing"},
      {"label": "RLVAC"}]}]}
  (tmp_path / "a.mrk.json").write_text(json.dumps(doc))
  points = io.load_landmarks(tmp_path / "a.mrk.json", NAMES)
  np.testing.assert_array_equal(points[0], [-1.0, -2.0, 3.0])
  assert np.all(np.isnan(points[1:]))
  doc["markups"][0]["coordinateSystem"] = "RAS"
  (tmp_path / "b.mrk.json").write_text(json.dumps(doc))
  np.testing.assert_array_equal(io.load_landmarks(tmp_path / "b.mrk.json", NAMES)[0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("header, expected_x", [("# CoordinateSystem = 0", 5.0), ("# CoordinateSystem = RAS", 5.0),
                                                ("# CoordinateSystem = 1", -5.0), ("# CoordinateSystem = LPS", -5.0),
                                                ("", 5.0)])
def test_fcsv_coordinate_system_header(tmp_path, header, expected_x):
  text = "\n".join(["# Markups fiducial file version = 4.6", header,
                    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
                    "vtkMRMLMarkupsFiducialNode_1,5,6,7,0,0,0,1,1,1,0,PC,,"])
  (tmp_path / "a.fcsv").write_text(text)
  points = io.load_landmarks(tmp_path / "a.fcsv", NAMES)
  np.testing.assert_array_equal(points[1], [expected_x, expected_x + 1 if expected_x > 0 else -6.0, 7.0])


def test_predictions_csv_has_the_documented_columns(tmp_path):
  io.write_predictions_csv(tmp_path / "p.csv", [
      {"case_id": "c0", "label": "AC", "x": 1.5, "y": -2.0, "z": 3.0, "std_x": 0.1, "std_y": 0.2, "std_z": 0.3,
       "confidence_volume_mm3": 1.25, "presence": 0.97, "status": "ok", "seconds": 2.5},
      {"case_id": "c0", "label": "PC", "x": float("nan"), "y": float("nan"), "z": float("nan"), "std_x": float("nan"),
       "std_y": float("nan"), "std_z": float("nan"), "confidence_volume_mm3": float("nan"), "presence": 0.02,
       "status": "absent"}])
  lines = (tmp_path / "p.csv").read_text().splitlines()
  assert lines[0] == "case_id,label,x,y,z,std_x,std_y,std_z,confidence_volume_mm3,presence,status,seconds"
  assert lines[1] == "c0,AC,1.5,-2.0,3.0,0.1,0.2,0.3,1.25,0.97,ok,2.5" and lines[2] == "c0,PC,,,,,,,,0.02,absent,"


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
  path = tmp_path / "a.csv"
  io.write_landmarks_csv(path, NAMES[:1], np.array([[1.0, 2.0, 3.0]]))
  before = path.read_text()
  monkeypatch.setattr(io.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):
    io.write_landmarks_csv(path, NAMES[:1], np.array([[9.0, 9.0, 9.0]]))
  assert path.read_text() == before and not list(tmp_path.glob(".*tmp"))


# ---------------------------------------------------------------- manifest

def _dataset(tmp_path, cases=None, landmarks=("AC", "PC")):
  (tmp_path / "images").mkdir(exist_ok=True)
  (tmp_path / "landmarks").mkdir(exist_ok=True)
  _save(tmp_path / "images" / "c0.nii.gz", np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32), np.eye(4))
  io.write_mrk_json(tmp_path / "landmarks" / "c0.mrk.json", ["AC"], np.array([[1.0, 1.0, 1.0]]))
  cases = cases if cases is not None else [
      {"id": "c0", "image": "images/c0.nii.gz", "landmarks": "landmarks/c0.mrk.json", "split": "train"},
      {"id": "c1", "image": "images/c0.nii.gz", "split": "test"},
      {"id": "c2", "image": "images/c0.nii.gz", "landmarks": "landmarks/c0.mrk.json"}]
  (tmp_path / "dataset.json").write_text(json.dumps({"name": "t", "landmarks": list(landmarks), "cases": cases}))
  return tmp_path / "dataset.json"


def test_portable_path_is_relative_inside_the_working_directory_and_absolute_outside(tmp_path, monkeypatch):
  (tmp_path / "here" / "sets").mkdir(parents=True)
  monkeypatch.chdir(tmp_path / "here")
  assert io.portable_path(tmp_path / "here" / "sets" / "a.json") == "sets/a.json"
  assert io.portable_path("sets/a.json") == "sets/a.json"  # already relative: stays
  assert io.portable_path(tmp_path / "elsewhere" / "a.json") == str(tmp_path / "elsewhere" / "a.json")
  assert io.portable_path("../elsewhere/a.json").startswith("/")  # outside by way of "..": absolute


def test_manifest_resolves_paths_and_default_split(tmp_path):
  manifest = dataset.load_manifest(_dataset(tmp_path))
  assert manifest.landmarks == ("AC", "PC") and manifest.name == "t"
  assert [c.split for c in manifest.cases] == ["train", "test", "train"]
  assert manifest.cases[0].image == (tmp_path / "images" / "c0.nii.gz").resolve()
  assert manifest.cases[1].landmarks is None
  assert [c.id for c in manifest.split("train")] == ["c0", "c2"]
  assert dataset.load_manifest(tmp_path) == manifest  # a folder means its dataset.json


def test_a_case_may_list_landmarks_outside_its_image_and_its_example_says_so(tmp_path):
  """c0 places AC and lists PC as absent (a partial field of view): PC is absent (0), not unknown (NaN)."""
  path = _dataset(tmp_path, [{"id": "c0", "image": "images/c0.nii.gz", "landmarks": "landmarks/c0.mrk.json",
                              "absent": ["PC"]}, {"id": "c1", "image": "images/c0.nii.gz", "split": "test"}])
  manifest = dataset.load_manifest(path)
  assert manifest.cases[0].absent == ("PC",) and manifest.cases[1].absent == ()
  settings = loader.PreprocessSettings(spacings_mm=(2.0,), finest_size=4, intensity="none")
  for case in manifest.cases:  # a 4^3 image is too small to predict on; only the landmarks matter here
    io.save_volume(case.image, np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32), np.eye(4))
  first, second = (loader.load_example(c, manifest.landmarks, settings, tmp_path / "cache") for c in manifest.cases)
  np.testing.assert_array_equal(first.presence(), [1.0, 0.0])
  assert np.all(np.isnan(second.presence()))  # nothing annotated: nothing known
  np.testing.assert_array_equal(first.grid[0], np.eye(4))  # the image's own field of view, for presence
  assert first.grid[1] == (20, 20, 20)


# ---------------------------------------------------------------- bad input: one table

def _bad_volume(tmp_path, kind):
  path = tmp_path / "bad.nii.gz"
  good = np.random.default_rng(0).normal(size=(5, 5, 5)).astype(np.float32)
  if kind == "missing":
    return tmp_path / "nope.nii.gz"
  if kind == "garbage":
    path.write_bytes(b"this is not a nifti file at all" * 20)
  elif kind == "truncated":
    _save(path, good, np.eye(4))
    path.write_bytes(path.read_bytes()[:200])
  elif kind == "2d":
    _save(path, good[:, :, 0], np.eye(4))
  elif kind == "4d":
    _save(path, np.stack([good, good], axis=-1), np.eye(4))
  elif kind == "nan":
    _save(path, np.where(good > 1.5, np.nan, good).astype(np.float32), np.eye(4))
  elif kind == "inf":
    _save(path, np.where(good > 1.5, np.inf, good).astype(np.float32), np.eye(4))
  elif kind == "constant":
    _save(path, np.full((5, 5, 5), 7, np.int16), np.eye(4))
  elif kind == "singular":
    _save(path, good, np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), qform=False)
  elif kind == "zero_spacing":
    _save(path, good, np.diag([1.0, 0.0, 1.0, 1.0]), qform=False)
  return path


BAD_LANDMARK_FILES = {  # kind: (file name, content)
    "duplicate_label": ("a.csv", "label,x,y,z\nAC,1,2,3\nAC,4,5,6\n"),
    "malformed_json": ("a.mrk.json", '{"markups": [{"controlPoints": ['),
    "not_markups": ("a.mrk.json", '{"points": []}'),
    "malformed_csv": ("a.csv", "label,x,y,z\nAC,1,two,3\n"),
    "csv_header": ("a.csv", "name,a,b,c\nAC,1,2,3\n"),
    "unknown_frame_json": ("a.mrk.json", json.dumps({"markups": [{"coordinateSystem": "IJK", "controlPoints": [
        {"label": "AC", "position": [1, 2, 3]}]}]})),
    "unknown_frame_fcsv": ("a.fcsv", "# CoordinateSystem = 7\nn1,1,2,3,0,0,0,1,1,1,0,AC,,\n"),
    "bad_position": ("a.mrk.json", json.dumps({"markups": [{"controlPoints": [{"label": "AC", "position": [1, 2]}]}]})),
    "unknown_type": ("a.txt", "AC 1 2 3"),
}


def _bad_landmarks(tmp_path, kind):
  if kind == "unknown_label":
    io.write_landmarks_csv(tmp_path / "a.csv", ["AC", "XYZ"], np.ones((2, 3)))
    return tmp_path / "a.csv"
  if kind in BAD_LANDMARK_FILES:
    name, content = BAD_LANDMARK_FILES[kind]
    (tmp_path / name).write_text(content)
    return tmp_path / name
  return tmp_path / "missing.fcsv"


def _bad_manifest(tmp_path, kind):
  good = [{"id": "c0", "image": "images/c0.nii.gz", "landmarks": "landmarks/c0.mrk.json"}]
  if kind == "missing_image":
    return _dataset(tmp_path, [{"id": "c0", "image": "images/none.nii.gz"}])
  if kind == "missing_landmarks":
    return _dataset(tmp_path, [{"id": "c0", "image": "images/c0.nii.gz", "landmarks": "landmarks/none.fcsv"}])
  if kind == "duplicate_id":
    return _dataset(tmp_path, good * 2)
  if kind == "bad_split":
    return _dataset(tmp_path, [dict(good[0], split="validation")])
  if kind == "no_cases":
    return _dataset(tmp_path, [])
  if kind == "no_landmarks":
    return _dataset(tmp_path, good, landmarks=())
  if kind == "duplicate_names":
    return _dataset(tmp_path, good, landmarks=("AC", "AC"))
  if kind == "path_in_id":
    return _dataset(tmp_path, [dict(good[0], id="../../x")])
  if kind == "misspelt_split":
    return _dataset(tmp_path, [dict(good[0], spilt="test")])
  if kind == "unknown_top_key":
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "dataset.json").write_text(json.dumps({"landmarks": ["AC"], "cases": good, "landmark": ["AC"]}))
    return tmp_path / "dataset.json"
  if kind == "unknown_absent":
    return _dataset(tmp_path, [dict(good[0], absent=["XYZ"])])
  if kind == "placed_absent":
    return _dataset(tmp_path, [dict(good[0], absent=["AC"])])
  if kind == "malformed":
    (tmp_path / "dataset.json").write_text("{'name': 1}")
    return tmp_path / "dataset.json"
  return tmp_path / "nothing" / "dataset.json"


BAD_INPUTS = [
    # (what, how to make it, call, message)
    ("missing image", "missing", "volume", "no such file"),
    ("not a NIfTI file", "garbage", "volume", "cannot read the image"),
    ("truncated .nii.gz", "truncated", "volume", "cannot read the image"),
    ("2-D image", "2d", "volume", "expected a 3-D image, got 2"),
    ("4-D image", "4d", "volume", "expected a 3-D image, got 4"),
    ("NaN voxels", "nan", "volume", "NaN or infinite"),
    ("Inf voxels", "inf", "volume", "NaN or infinite"),
    ("constant image", "constant", "volume", "constant"),
    ("singular affine", "singular", "volume", "singular"),
    ("zero-spacing affine", "zero_spacing", "volume", "zero voxel spacing"),
    ("unknown landmark label", "unknown_label", "landmarks", "unknown landmark label 'XYZ'"),
    ("duplicate landmark label", "duplicate_label", "landmarks", "appears more than once"),
    ("malformed JSON", "malformed_json", "landmarks", "malformed JSON"),
    ("JSON that is not a markups file", "not_markups", "landmarks", "expected markups"),
    ("non-numeric CSV coordinate", "malformed_csv", "landmarks", "non-numeric"),
    ("CSV without its header", "csv_header", "landmarks", "header row label,x,y,z"),
    ("unknown coordinate system (.mrk.json)", "unknown_frame_json", "landmarks", "unknown coordinate system"),
    ("unknown coordinate system (.fcsv)", "unknown_frame_fcsv", "landmarks", "unknown coordinate system"),
    ("malformed position", "bad_position", "landmarks", "malformed position"),
    ("unknown landmark file type", "unknown_type", "landmarks", "unknown landmark file type"),
    ("missing landmark file", "missing", "landmarks", "no such file"),
    ("manifest naming a missing image", "missing_image", "manifest", "does not exist"),
    ("manifest naming a missing landmark file", "missing_landmarks", "manifest", "does not exist"),
    ("manifest with a repeated case id", "duplicate_id", "manifest", "appears more than once"),
    ("manifest with an unknown split", "bad_split", "manifest", "has split 'validation'"),
    ("manifest without cases", "no_cases", "manifest", "non-empty list"),
    ("manifest without landmark names", "no_landmarks", "manifest", "non-empty list of landmark names"),
    ("manifest repeating a landmark name", "duplicate_names", "manifest", "repeats names"),
    ("manifest case id with a path (traversal)", "path_in_id", "manifest", r"case id '../../x' is not a plain file"),
    ("manifest case with a misspelt key", "misspelt_split", "manifest", r"unknown keys \['spilt'\]; allowed"),
    ("manifest with an unknown key", "unknown_top_key", "manifest", r"unknown keys \['landmark'\]; allowed"),
    ("manifest listing an unknown landmark as absent", "unknown_absent", "manifest", r"does not: \['XYZ'\]"),
    ("a case listing as absent a landmark it places", "placed_absent", "example",
     r"lists as absent landmarks its file places: \['AC'\]"),
    ("malformed manifest JSON", "malformed", "manifest", "malformed JSON"),
    ("missing manifest", "missing", "manifest", "no such file"),
]


@pytest.mark.parametrize("what, kind, call, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_one_clear_error_naming_the_file(tmp_path, what, kind, call, message):
  if call == "volume":
    path = _bad_volume(tmp_path, kind)
    run = lambda: io.load_volume(path)  # noqa: E731
  elif call == "landmarks":
    path = _bad_landmarks(tmp_path, kind)
    run = lambda: io.load_landmarks(path, ["AC", "PC"])  # noqa: E731
  elif call == "example":
    path = _bad_manifest(tmp_path, kind)
    manifest = dataset.load_manifest(path)
    settings = loader.PreprocessSettings(spacings_mm=(2.0,), finest_size=4, intensity="none")
    run = lambda: loader.load_example(manifest.cases[0], manifest.landmarks, settings, None)  # noqa: E731
    path = manifest.cases[0].landmarks  # the error names the landmark file
  else:
    path = _bad_manifest(tmp_path, kind)
    run = lambda: dataset.load_manifest(path)  # noqa: E731
  with pytest.raises(io.DataError, match=message) as error:
    run()
  assert str(path.name) in str(error.value) or "dataset.json" in str(error.value)
  assert "\n" not in str(error.value)


def test_empty_split_is_an_error(tmp_path):
  manifest = dataset.load_manifest(_dataset(tmp_path))
  with pytest.raises(io.DataError, match="'val' split has no cases"):
    manifest.split("val")


def test_landmark_outside_the_image_is_an_error(tmp_path):
  volume = io.load_volume(_save(tmp_path / "x.nii.gz", np.random.default_rng(0).normal(size=(10, 10, 10)).astype(
      np.float32), AFFINES["LPS"]))
  inside = geometry.vox_to_mm(np.array([[5.0, 5.0, 5.0], [np.nan] * 3]), volume.affine)
  io.check_landmarks_in_image(inside, ["AC", "PC"], volume, "case.fcsv")
  outside = geometry.vox_to_mm(np.array([[5.0, 5.0, 5.0], [5.0, 12.0, 5.0]]), volume.affine)
  with pytest.raises(io.DataError, match="case.fcsv: landmark 'PC' .* lies outside the image"):
    io.check_landmarks_in_image(outside, ["AC", "PC"], volume, "case.fcsv")
