"""Reading and writing what users hand us: NIfTI volumes and 3D Slicer landmark files (the manifest: `dataset`).

Frames: every volume comes with its voxel->RAS `affine` (nibabel's ``img.affine``); every landmark
array is ``(K, 3)`` RAS mm with NaN rows for missing landmarks, ordered like the names asked for.
Files in LPS (Slicer's default when saving `.mrk.json`) are converted on reading and say their frame
on writing. Every problem with an input raises `DataError` naming the file and what is wrong; writers
replace their file atomically, so an interrupted write never leaves a half-written output.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io as _io
import json
import math
import os
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from locnet_jax import geometry

FCSV_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
                "associatedNodeID")
MRK_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
              "Schema/markups-schema-v1.0.3.json#")


class DataError(ValueError):
  """Bad input data: the message names the file and the problem (the CLIs print it on one line)."""

  def __init__(self, path, problem: str):
    self.path, self.problem = str(path), problem
    super().__init__(f"{path}: {problem}")

  def __reduce__(self):  # crosses process boundaries (data preparation workers) intact
    return DataError, (self.path, self.problem)


# ---------------------------------------------------------------- volumes

@dataclasses.dataclass(frozen=True)
class Volume:
  """A 3-D image: `data` (X, Y, Z) float32 in physical units (scl_slope/scl_inter applied) and its
  voxel->RAS `affine` (4, 4) float64."""

  data: np.ndarray
  affine: np.ndarray

  @property
  def spacing_mm(self) -> np.ndarray:
    return geometry.voxel_spacing_mm(self.affine)


def check_affine(affine: np.ndarray, path) -> None:
  """Raises DataError unless `affine` is a finite, invertible 4x4 voxel->world matrix with non-zero spacing."""
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise DataError(path, f"the affine must be a finite 4x4 matrix, got {affine.tolist()}")
  spacing = geometry.voxel_spacing_mm(affine)
  if np.any(spacing < 1e-6):
    raise DataError(path, f"zero voxel spacing {spacing.tolist()} in the affine")
  if abs(np.linalg.det(affine[:3, :3])) < 1e-9 * np.prod(spacing):
    raise DataError(path, "the affine is singular (its voxel axes are not independent)")
  if not np.allclose(affine[3], [0, 0, 0, 1]):
    raise DataError(path, f"the affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}")


def check_volume_data(data: np.ndarray, path) -> None:
  """Raises DataError for anything but a finite, non-constant, non-empty 3-D array."""
  if data.ndim != 3:
    raise DataError(path, f"expected a 3-D image, got {data.ndim} dimensions {tuple(data.shape)}")
  if data.size == 0:
    raise DataError(path, f"the image is empty, shape {tuple(data.shape)}")
  finite = np.isfinite(data)
  if not finite.all():
    raise DataError(path, f"{int(data.size - finite.sum())} voxels are NaN or infinite")
  if float(data.max()) == float(data.min()):
    raise DataError(path, f"the image is constant (every voxel is {float(data.min())})")


def load_volume(path) -> Volume:
  """Reads a NIfTI-1/2 volume (`.nii`, `.nii.gz`) in any orientation, spacing and stored dtype.

  A 4-D image whose extra axes have length 1 is accepted as 3-D; anything else that is not 3-D, a
  truncated or unreadable file, NaN/Inf voxels, a constant image or a singular affine raise DataError.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(path, "no such file")
  try:
    image = nib.load(str(path))
    data = np.asarray(image.get_fdata(dtype=np.float32))
  except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as e:
    raise DataError(path, f"cannot read the image ({type(e).__name__}: {e}); is it a complete NIfTI file?") \
        from None
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  check_volume_data(data, path)
  affine = np.asarray(image.affine, np.float64)
  check_affine(affine, path)
  return Volume(data=data, affine=affine)


def load_grid(path) -> tuple[np.ndarray, tuple[int, int, int]]:
  """The voxel grid of a NIfTI image from its header alone (no voxel data read): (voxel->RAS affine (4, 4),
  shape (3,)), the image's field of view; the same affine and shape `load_volume` gives, and DataError for
  what it refuses in the header (not 3-D, a singular affine, an unreadable file)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(path, "no such file")
  try:
    image = nib.load(str(path))
  except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as e:
    raise DataError(path, f"cannot read the image header ({type(e).__name__}: {e}); is it a NIfTI file?") from None
  shape = tuple(int(n) for n in image.shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise DataError(path, f"expected a 3-D image, got shape {shape}")
  affine = np.asarray(image.affine, np.float64)
  check_affine(affine, path)
  return affine, shape


def save_volume(path, data: np.ndarray, affine: np.ndarray) -> None:
  """Writes a NIfTI volume (gzip-compressed for `.nii.gz`) with `affine` as both sform and qform."""
  image = nib.Nifti1Image(np.asarray(data), np.asarray(affine, np.float64))
  image.set_sform(np.asarray(affine, np.float64), code=1)
  image.set_qform(np.asarray(affine, np.float64), code=1)
  atomic_write(path, image.to_bytes() if not str(path).endswith(".gz") else gzip.compress(image.to_bytes(), 6))


# ---------------------------------------------------------------- landmark files

def _frame_to_ras(points: np.ndarray, frame: str, path) -> np.ndarray:
  if frame == "RAS":
    return points
  if frame == "LPS":
    return geometry.lps_to_ras(points)
  raise DataError(path, f"unknown coordinate system {frame!r} (expected RAS or LPS)")


def read_mrk_json(path) -> list[tuple[str, np.ndarray | None]]:
  """(label, RAS mm position or None if missing) of each control point of a Slicer `.mrk.json`."""
  try:
    doc = json.loads(Path(path).read_text())
    markup = doc["markups"][0]
    points = markup["controlPoints"]
  except json.JSONDecodeError as e:
    raise DataError(path, f"malformed JSON ({e})") from None
  except (KeyError, IndexError, TypeError):
    raise DataError(path, "not a Slicer markups file: expected markups[0].controlPoints") from None
  frame = str(markup.get("coordinateSystem", "LPS")).upper()
  out = []
  for i, point in enumerate(points):
    if not isinstance(point, dict) or not isinstance(point.get("label"), str) or not point["label"]:
      raise DataError(path, f"control point {i} has no label")
    position = point.get("position")
    if point.get("positionStatus") in ("undefined", "missing") or position is None:
      out.append((point["label"], None))
      continue
    try:
      xyz = np.asarray(position, np.float64)
    except (TypeError, ValueError):
      raise DataError(path, f"control point {point['label']!r} has a malformed position {position!r}") from None
    if xyz.shape != (3,) or not np.all(np.isfinite(xyz)):
      raise DataError(path, f"control point {point['label']!r} has a malformed position {position!r}")
    out.append((point["label"], _frame_to_ras(xyz, frame, path)))
  return out


def read_fcsv(path) -> list[tuple[str, np.ndarray | None, str]]:
  """(label, RAS mm position, description) of each row of a Slicer fiducial CSV (`.fcsv`)."""
  frame, columns, rows = "RAS", list(FCSV_COLUMNS), []
  try:
    lines = Path(path).read_text().splitlines()
  except UnicodeDecodeError:
    raise DataError(path, "not a text file") from None
  for line in lines:
    if line.startswith("#"):
      key, _, value = line[1:].partition("=")
      key, value = key.strip().lower(), value.strip()
      if key == "coordinatesystem":
        frame = {"0": "RAS", "1": "LPS"}.get(value, value.upper())
      elif key == "columns":
        columns = [c.strip() for c in value.split(",")]
    elif line.strip():
      rows.append(line)
  missing = {"x", "y", "z", "label"} - set(columns)
  if missing:
    raise DataError(path, f"the columns header lacks {sorted(missing)}")
  out = []
  for n, row in enumerate(csv.reader(rows), start=1):
    if len(row) < len(columns) - 2:  # Slicer leaves trailing empty fields out at times
      raise DataError(path, f"data row {n} has {len(row)} fields, expected {len(columns)}")
    record = dict(zip(columns, row))
    label = record.get("label", "").strip()
    if not label:
      raise DataError(path, f"data row {n} has no label")
    try:
      xyz = np.array([float(record["x"]), float(record["y"]), float(record["z"])])
    except (KeyError, ValueError):
      raise DataError(path, f"data row {n} ({label!r}) has non-numeric coordinates") from None
    if not np.all(np.isfinite(xyz)):
      out.append((label, None, record.get("desc", "")))
      continue
    out.append((label, _frame_to_ras(xyz, frame, path), record.get("desc", "")))
  return out


def read_landmarks_csv(path) -> list[tuple[str, np.ndarray | None]]:
  """(label, RAS mm) of each row of a plain CSV with header `label,x,y,z`; empty x/y/z means missing."""
  try:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      if reader.fieldnames is None or not {"label", "x", "y", "z"} <= {c.strip() for c in reader.fieldnames}:
        raise DataError(path, f"expected a header row label,x,y,z, got {reader.fieldnames}")
      rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
  except (UnicodeDecodeError, csv.Error) as e:
    raise DataError(path, f"malformed CSV ({e})") from None
  out = []
  for n, r in enumerate(rows, start=1):
    if not r["label"]:
      raise DataError(path, f"row {n} has no label")
    if not (r["x"] or r["y"] or r["z"]):
      out.append((r["label"], None))
      continue
    try:
      xyz = np.array([float(r["x"]), float(r["y"]), float(r["z"])])
    except ValueError:
      raise DataError(path, f"row {n} ({r['label']!r}) has non-numeric coordinates") from None
    out.append((r["label"], xyz if np.all(np.isfinite(xyz)) else None))
  return out


def load_landmarks(path, names: Sequence[str]) -> np.ndarray:
  """Landmarks of one case as (K, 3) float64 RAS mm in the order of `names`, NaN rows where missing.

  The format follows the suffix: `.mrk.json`, `.fcsv` or `.csv`. Points are matched by label
  (case-sensitive); an unknown or repeated label is an error.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(path, "no such file")
  suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".mrk.json") else path.suffix
  readers = {".mrk.json": read_mrk_json, ".fcsv": read_fcsv, ".csv": read_landmarks_csv}
  if suffix not in readers:
    raise DataError(path, f"unknown landmark file type {suffix!r} (expected .mrk.json, .fcsv or .csv)")
  index = {name: k for k, name in enumerate(names)}
  out = np.full((len(names), 3), np.nan)
  seen = set()
  for label, xyz, *_ in readers[suffix](path):
    if label not in index:
      raise DataError(path, f"unknown landmark label {label!r} (the data set names {list(names)})")
    if label in seen:
      raise DataError(path, f"landmark label {label!r} appears more than once")
    seen.add(label)
    if xyz is not None:
      out[index[label]] = xyz
  return out


def check_landmarks_in_image(points_mm: np.ndarray, names: Sequence[str], volume: Volume, path) -> None:
  """Raises DataError if an annotated landmark lies outside the image's field of view (the box its voxels
  cover, `geometry.depth_in_grid_mm` below 0)."""
  points_mm = np.asarray(points_mm, np.float64)
  vox = geometry.mm_to_vox(points_mm, volume.affine)
  depth_mm = geometry.depth_in_grid_mm(points_mm, volume.affine, volume.data.shape)
  for name, v, depth in zip(names, vox, depth_mm):
    if np.all(np.isfinite(v)) and depth < 0:
      raise DataError(path, f"landmark {name!r} at voxel {np.round(v, 1).tolist()} lies outside the image "
                            f"(shape {list(volume.data.shape)}); are the image and the landmarks of the same case?")


# ---------------------------------------------------------------- writing

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def portable_path(path) -> str:
  """`path` as a record should name it: relative to the working directory when inside it (a model card
  travels with its repository), else absolute."""
  path, here = Path(os.path.abspath(path)), Path.cwd()  # abspath: "sets/../x" normalised, symlinks kept
  return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)


def atomic_write(path, content: bytes | str) -> None:
  """Writes `content` to a temporary file beside `path`, then renames it over `path`."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(content.encode() if isinstance(content, str) else content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _present(names, points_mm):
  points_mm = np.asarray(points_mm, np.float64)
  if points_mm.shape != (len(names), 3):
    raise ValueError(f"points_mm must be ({len(names)}, 3) for {len(names)} names, got {points_mm.shape}")
  return [(k, name, points_mm[k]) for k, name in enumerate(names) if np.all(np.isfinite(points_mm[k]))]


def write_mrk_json(path, names: Sequence[str], points_mm: np.ndarray, *, coordinate_system: str = "RAS",
                   descriptions: Sequence[str] | None = None, unplaced: Sequence[str] = ()) -> None:
  """A Slicer `.mrk.json` (opens on top of the image in 3D Slicer); missing landmarks are left out, except
  those named in `unplaced`, written as Slicer stores a point not placed: ``"positionStatus": "undefined"``
  and no position (an absent landmark). `descriptions`: one per name (Slicer shows it beside the point)."""
  frame = coordinate_system.upper()
  if frame not in ("RAS", "LPS"):
    raise ValueError(f"coordinate_system must be RAS or LPS, got {coordinate_system!r}")
  if descriptions is not None and len(descriptions) != len(names):
    raise ValueError(f"descriptions must have one entry per name ({len(names)}), got {len(descriptions)}")
  placed = {k: xyz for k, _, xyz in _present(names, points_mm)}
  points = []
  for k, name in enumerate(names):
    if k not in placed and name not in unplaced:
      continue
    point = {"id": str(k + 1), "label": name, "description": descriptions[k] if descriptions else "",
             "associatedNodeID": "", "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
             "selected": True, "locked": False, "visibility": True, "positionStatus": "undefined"}
    if k in placed:
      xyz = placed[k] if frame == "RAS" else geometry.ras_to_lps(placed[k])
      point.update(position=[float(v) for v in xyz], positionStatus="defined")
    points.append(point)
  doc = {"@schema": MRK_SCHEMA, "markups": [{"type": "Fiducial", "coordinateSystem": frame,
                                            "coordinateUnits": "mm", "controlPoints": points}]}
  atomic_write(path, json.dumps(doc, indent=2) + "\n")


def write_fcsv(path, names: Sequence[str], points_mm: np.ndarray, *, coordinate_system: str = "RAS") -> None:
  """A Slicer fiducial CSV (version 4.11 header); missing landmarks are left out."""
  frame = coordinate_system.upper()
  if frame not in ("RAS", "LPS"):
    raise ValueError(f"coordinate_system must be RAS or LPS, got {coordinate_system!r}")
  out = _io.StringIO()
  out.write("# Markups fiducial file version = 4.11\n")
  out.write(f"# CoordinateSystem = {frame}\n")
  out.write("# columns = " + ",".join(FCSV_COLUMNS) + "\n")
  writer = csv.writer(out, lineterminator="\n")
  for k, name, xyz in _present(names, points_mm):
    xyz = xyz if frame == "RAS" else geometry.ras_to_lps(xyz)
    writer.writerow([f"vtkMRMLMarkupsFiducialNode_{k + 1}", *(repr(float(v)) for v in xyz),
                     0, 0, 0, 1, 1, 1, 0, name, "", ""])
  atomic_write(path, out.getvalue())


def write_landmarks_csv(path, names: Sequence[str], points_mm: np.ndarray) -> None:
  """A plain `label,x,y,z` CSV in RAS mm; missing landmarks are left out."""
  out = _io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["label", "x", "y", "z"])
  for _, name, xyz in _present(names, points_mm):
    writer.writerow([name, *(repr(float(v)) for v in xyz)])
  atomic_write(path, out.getvalue())


PREDICTION_COLUMNS = ("case_id", "label", "x", "y", "z", "std_x", "std_y", "std_z", "confidence_volume_mm3",
                      "presence", "status", "seconds")


def write_predictions_csv(path, rows: Sequence[dict]) -> None:
  """The predictions CSV of docs/data_format.md: one row per (case, landmark), RAS mm; NaN written as empty."""
  out = _io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(PREDICTION_COLUMNS)
  for row in rows:
    values = []
    for column in PREDICTION_COLUMNS:
      v = row.get(column, "")
      values.append("" if isinstance(v, float) and math.isnan(v) else (repr(float(v)) if isinstance(
          v, (float, np.floating)) else v))
    writer.writerow(values)
  atomic_write(path, out.getvalue())
