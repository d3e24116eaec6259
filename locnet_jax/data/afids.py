"""The AFIDs real-data benchmark: warped copies of the MNI152NLin2009cAsym template with its 32 AFIDs.

    python -m locnet_jax.data.afids --out data/afids [--num-train 48 --num-val 8 --num-test 16]
        [--seed 0] [--landmarks AC,PC,...] [--modality T1w|T2w] [--elastic] [--source DIR]

Every case is the template under a known random spatial transform (rotation up to +-15 deg about each
axis around the world origin, which lies near AC in MNI space; translation up to +-20 mm; scale
0.9-1.1 per axis; optionally a mild smooth elastic warp), with intensity changes (gamma, a smooth bias
field, global scale, noise), stored as int16 NIfTI (with scl_slope) in a randomly chosen orientation
(RAS, LPS, LAS or a permuted axis order), with the expert AFIDs moved by the same transform and
written as Slicer `.mrk.json` (LPS, as Slicer saves) or `.fcsv` (RAS). Landmarks are named by the AFID
acronyms (AC, PC, ICS, ...). `build_info.json` records each case's transform and the constant-prediction
baseline (the mean training position) on the test split.

Source files: `--source DIR` (a folder holding the template files under their templateflow names), else
the folder in the environment variable LOCNET_AFIDS_SOURCE, else the PyPI wheel ``autoafids==0.1.4``,
fetched once with ``pip download --no-deps`` into a cache folder and read as a zip. Every file is checked
by md5. Nothing else is fetched. The four expert raters' own AFIDs (the human error floor) ship with
this package (`resources/afids/`, CC BY 4.0, see its NOTICE.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

from locnet_jax import geometry, io, parallel
from locnet_jax.data import augment_host, preprocess

# The 32 AFIDs in file order (acronyms from afids-utils' afids_descs.json, MIT licence).
AFID_NAMES = ("AC", "PC", "ICS", "PMJ", "SIPF", "RSLMS", "LSLMS", "RILMS", "LILMS", "CUL", "IMS", "RMB", "LMB",
              "PG", "RLVAC", "LLVAC", "RLVPC", "LLVPC", "GENU", "SPLE", "RALTH", "LALTH", "RSAMTH", "LSAMTH",
              "RIAMTH", "LIAMTH", "RIGO", "LIGO", "RVOH", "LVOH", "ROSF", "LOSF")
PREFIX = "tpl-MNI152NLin2009cAsym_res-01_"
FILES = {  # role: (file name, md5)
    "T1w": (PREFIX + "T1w.nii.gz", "6c64ebf985fe30d93e49a4baa41b9278"),
    "T2w": (PREFIX + "T2w.nii.gz", "e61069d8921aeb5326187e98caaf8dff"),
    "afids": (PREFIX + "desc-groundtruth_afids.fcsv", "a78f80cc788dd242d11f9554d61c78d1"),
}
WHEEL = ("autoafids", "0.1.4", "autoafids/resources/")
SOURCE_ENV = "LOCNET_AFIDS_SOURCE"  # a folder with the template files, read instead of the wheel
RESOURCES = Path(__file__).resolve().parent / "resources" / "afids"  # consensus + raters' AFIDs (CC BY 4.0)
ORIENTATIONS = {  # name: (permutation of the template's voxel axes, flip of each new axis)
    "RAS": ((0, 1, 2), (False, False, False)),
    "LPS": ((0, 1, 2), (True, True, False)),
    "LAS": ((0, 1, 2), (True, False, False)),
    "ASR": ((1, 2, 0), (False, False, False)),
}


def _md5(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


def read_source_files(*, source: Path | str | None = None, cache_dir: Path | None = None,
                      roles=("T1w", "afids")) -> dict[str, bytes]:
  """The template files' bytes by role, md5-checked: from the folder `source`, from the wheel when
  `source == "wheel"`, and by default from the folder in $LOCNET_AFIDS_SOURCE if set, else the wheel."""
  if source == "wheel":
    return read_wheel(fetch_wheel(cache_dir), roles=roles)
  folder = source if source is not None else (os.environ.get(SOURCE_ENV) or None)
  out = {}
  if folder is not None:
    for role in roles:
      path = Path(folder) / FILES[role][0]
      if not path.is_file():
        raise io.DataError(path, f"missing AFIDs source file ({role})")
      out[role] = path.read_bytes()
      if _md5(out[role]) != FILES[role][1]:
        raise io.DataError(path, f"md5 {_md5(out[role])} differs from the expected {FILES[role][1]}")
    return out
  return read_wheel(fetch_wheel(cache_dir), roles=roles)


def fetch_wheel(cache_dir: Path | None = None) -> Path:
  """Downloads the autoafids wheel once (pip, from the package registry) and returns its path."""
  cache_dir = Path(cache_dir or Path.home() / ".cache" / "locnet_jax")
  name, version, _ = WHEEL
  found = sorted(cache_dir.glob(f"{name}-{version}-*.whl"))
  if found:
    return found[0]
  cache_dir.mkdir(parents=True, exist_ok=True)
  result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{name}=={version}",
                           "-d", str(cache_dir)], capture_output=True, text=True)
  found = sorted(cache_dir.glob(f"{name}-{version}-*.whl"))
  if result.returncode or not found:
    raise io.DataError(cache_dir, f"could not download {name}=={version}: {result.stderr.strip()[-300:]}")
  return found[0]


def read_wheel(wheel: Path, *, roles=("T1w", "afids")) -> dict[str, bytes]:
  """Reads the template files out of a wheel (a zip), md5-checked."""
  try:
    archive = zipfile.ZipFile(wheel)
  except (zipfile.BadZipFile, OSError) as e:
    raise io.DataError(wheel, f"not a readable wheel ({e})") from None
  out = {}
  with archive:
    for role in roles:
      member = WHEEL[2] + FILES[role][0]
      try:
        out[role] = archive.read(member)
      except KeyError:
        raise io.DataError(wheel, f"the wheel has no {member}") from None
      if _md5(out[role]) != FILES[role][1]:
        raise io.DataError(wheel, f"{member}: md5 {_md5(out[role])} differs from the expected {FILES[role][1]}")
  return out


def parse_afids(fcsv_bytes: bytes) -> np.ndarray:
  """The 32 AFIDs (32, 3) RAS mm, read by row order (the label columns of AFIDs files differ)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "afids.fcsv"
    path.write_bytes(fcsv_bytes)
    rows = io.read_fcsv(path)
  if len(rows) != len(AFID_NAMES) or any(xyz is None for _, xyz, _ in rows):
    raise io.DataError("afids.fcsv", f"expected {len(AFID_NAMES)} defined points, got {len(rows)}")
  return np.stack([xyz for _, xyz, _ in rows])


def load_template(data: bytes) -> io.Volume:
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "template.nii.gz"
    path.write_bytes(data)
    return io.load_volume(path)


def local_contrast(data: np.ndarray, affine: np.ndarray, points_mm: np.ndarray, *, radius_mm: float = 5.0) -> np.ndarray:
  """Image structure around each point: the std of the intensities (scaled by the 99.9th percentile) over
  the voxels within `radius_mm` of the point (RAS mm, (K, 3)) -> (K,). Near 0: a flat, low-contrast
  neighbourhood, where a landmark has little to be found by; larger: edges nearby."""
  data = np.asarray(data, np.float64)
  scaled = data / (float(np.percentile(data, 99.9)) or 1.0)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), axis=-1)
  out = []
  for point_mm in np.asarray(points_mm, np.float64).reshape(-1, 3):
    center_vox = geometry.mm_to_vox(point_mm, affine)
    reach = np.ceil(radius_mm / geometry.voxel_spacing_mm(affine)).astype(int) + 1
    lo = np.maximum(np.floor(center_vox).astype(int) - reach, 0)
    hi = np.minimum(np.floor(center_vox).astype(int) + reach + 1, data.shape)
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    distance = np.linalg.norm(geometry.vox_to_mm(grid[window].reshape(-1, 3), affine) - point_mm, axis=-1)
    inside = scaled[window].reshape(-1)[distance <= radius_mm]
    out.append(float(inside.std()) if inside.size else float("nan"))
  return np.asarray(out)


def landmark_contrast(names, *, source: Path | str | None = None, radius_mm: float = 5.0) -> dict[str, float]:
  """`local_contrast` of the T1w template at each named consensus AFID: {name: contrast}."""
  files = read_source_files(source=source)
  template, points = load_template(files["T1w"]), parse_afids(files["afids"])
  index = [AFID_NAMES.index(n) for n in names]
  values = local_contrast(template.data, template.affine, points[index], radius_mm=radius_mm)
  return dict(zip(names, values.tolist()))


# ---------------------------------------------------------------- random transforms

def random_affine_transform(rng: np.random.Generator, *, max_rotation_deg=15.0, max_translation_mm=20.0,
                            max_scale=0.1) -> np.ndarray:
  """A world->world (RAS mm) 4x4 transform: per-axis scale, then rotation, about the origin, then shift."""
  rotation = Rotation.from_euler("xyz", rng.uniform(-max_rotation_deg, max_rotation_deg, 3), degrees=True)
  transform = np.eye(4)
  transform[:3, :3] = rotation.as_matrix() @ np.diag(rng.uniform(1 - max_scale, 1 + max_scale, 3))
  transform[:3, 3] = rng.uniform(-max_translation_mm, max_translation_mm, 3)
  return transform


def reoriented_grid(affine: np.ndarray, shape, orientation: str) -> tuple[np.ndarray, tuple[int, int, int]]:
  """The same field of view as (`affine`, `shape`) stored with permuted and flipped voxel axes."""
  perm, flips = ORIENTATIONS[orientation]
  new_shape = tuple(int(shape[p]) for p in perm)
  index_map = np.zeros((4, 4))  # new voxel index -> old voxel index
  index_map[3, 3] = 1
  for new_axis, (old_axis, flip) in enumerate(zip(perm, flips)):
    index_map[old_axis, new_axis] = -1.0 if flip else 1.0
    index_map[old_axis, 3] = new_shape[new_axis] - 1 if flip else 0.0
  return affine @ index_map, new_shape


def vary_intensity(data: np.ndarray, rng: np.random.Generator, affine: np.ndarray) -> np.ndarray:
  """Gamma, a smooth multiplicative bias field (+-10 %), a global scale and 1 % noise."""
  top = float(np.percentile(data, 99.9)) or 1.0
  x = np.clip(data / top, 0, None) ** rng.uniform(0.8, 1.25)
  center = (np.asarray(data.shape) - 1) / 2
  axes = [(np.arange(n) - c) / n for n, c in zip(data.shape, center)]
  coefficients = rng.uniform(-0.2, 0.2, 3)
  bias = 1 + sum(c * a.reshape([-1 if i == k else 1 for i in range(3)]) for k, (c, a) in enumerate(
      zip(coefficients, axes)))
  x = x * bias * rng.uniform(0.9, 1.1) + rng.normal(0, 0.01, data.shape)
  return (np.clip(x, 0, None) * top).astype(np.float32)


def make_case(template: io.Volume, points_mm: np.ndarray, rng: np.random.Generator, *, elastic: bool = False,
              intensity: bool = True) -> dict:
  """One warped copy: {"data", "affine", "points_mm", "transform", "orientation"}."""
  transform = random_affine_transform(rng)
  orientation = list(ORIENTATIONS)[rng.integers(len(ORIENTATIONS))]
  affine, shape = reoriented_grid(template.affine, template.data.shape, orientation)
  field = augment_host.ElasticField.over_grid(rng, affine, shape, max_mm=3.0) if elastic else None
  data = preprocess.resample(template.data, template.affine, target_affine=affine, target_shape=shape,
                             world_map=augment_host.source_points(transform, field))
  if intensity:
    data = vary_intensity(data, rng, affine)
  return {"data": data, "affine": affine,
          "points_mm": augment_host.move_points(points_mm, transform=transform, elastic=field),
          "transform": transform, "orientation": orientation}


def parse_names(text: str) -> tuple[str, ...]:
  """"AC, PC,GENU" -> ("AC", "PC", "GENU"): a comma-separated list of AFID acronyms (blanks dropped)."""
  return tuple(n.strip() for n in text.split(",") if n.strip())


def save_int16(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
  """A NIfTI stored as int16 with scl_slope (as the benchmark's cases are), replaced atomically."""
  image = nib.Nifti1Image(data.astype(np.float32), None)
  image.set_sform(affine, code=1)
  image.set_qform(affine, code=1)
  image.header.set_data_dtype(np.int16)  # nibabel picks scl_slope / scl_inter to fit
  tmp = path.with_name(f".{path.name}.tmp.nii.gz")
  nib.save(image, str(tmp))
  os.replace(tmp, path)


_WORKER: dict = {}


def _init_worker(template_bytes: bytes, afids_bytes: bytes, index: tuple[int, ...]) -> None:
  _WORKER["template"] = load_template(template_bytes)
  _WORKER["points"] = parse_afids(afids_bytes)[list(index)]


def _write_case(job) -> tuple[dict, dict]:
  """Writes case i of the data set: (its manifest entry, its build_info entry)."""
  out_dir, i, split, seed, elastic, landmarks = job
  case = make_case(_WORKER["template"], _WORKER["points"], np.random.default_rng((seed, i)), elastic=elastic)
  case_id = f"case{i:03d}"
  image = f"images/{case_id}.nii.gz"
  save_int16(out_dir / image, case["data"], case["affine"])
  if i % 2 == 0:
    marks = f"landmarks/{case_id}.mrk.json"
    io.write_mrk_json(out_dir / marks, list(landmarks), case["points_mm"], coordinate_system="LPS")
  else:
    marks = f"landmarks/{case_id}.fcsv"
    io.write_fcsv(out_dir / marks, list(landmarks), case["points_mm"], coordinate_system="RAS")
  return ({"id": case_id, "image": image, "landmarks": marks, "split": split},
          {"id": case_id, "split": split, "orientation": case["orientation"],
           "transform_world": np.round(case["transform"], 8).tolist(), "points_mm": case["points_mm"].tolist()})


def build(out_dir, *, num_train: int = 48, num_val: int = 8, num_test: int = 16, seed: int = 0,
          landmarks=AFID_NAMES, modality: str = "T1w", elastic: bool = False, source: Path | str | None = None,
          cache_dir: Path | None = None, workers: int | None = None, log=print) -> Path:
  """Writes the data set and returns the path of its `dataset.json`.

  Cases are written by `workers` processes (None: one per CPU core, up to 8); case i always comes from
  the random stream (seed, i), so the data set is the same for any worker count.
  """
  unknown = [n for n in landmarks if n not in AFID_NAMES]
  if unknown or not landmarks:
    raise ValueError(f"unknown AFIDs {unknown} (known: {', '.join(AFID_NAMES)})")
  if modality not in ("T1w", "T2w"):
    raise ValueError(f"modality must be T1w or T2w, got {modality!r}")
  if min(num_train, num_val, num_test) < 0 or num_train < 1 or num_test < 1:
    raise ValueError("need at least one training and one test case (and no negative counts)")
  files = read_source_files(source=source, cache_dir=cache_dir, roles=(modality, "afids"))
  index = [AFID_NAMES.index(n) for n in landmarks]
  workers = parallel.cpu_workers() if workers is None else workers
  out_dir = Path(out_dir)
  (out_dir / "images").mkdir(parents=True, exist_ok=True)
  (out_dir / "landmarks").mkdir(parents=True, exist_ok=True)
  splits = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
  jobs = [(out_dir, i, split, seed, elastic, tuple(landmarks)) for i, split in enumerate(splits)]
  init = (files[modality], files["afids"], tuple(index))
  if workers <= 1:
    _init_worker(*init)
    written = map(_write_case, jobs)
  else:  # spawn: no fork of a process that may hold JAX's threads; results come back in case order
    pool = parallel.process_pool(workers, initializer=_init_worker, initargs=init)
    written = pool.map(_write_case, jobs)
  cases, info = [], []
  try:
    for case, case_info in written:
      cases.append(case)
      info.append(case_info)
      log(f"{case['id']} ({case['split']}, {case_info['orientation']}) written")
  finally:
    if workers > 1:
      pool.shutdown()
  baseline = constant_baseline(info, landmarks)
  manifest = {"name": f"afids-mni-{modality.lower()}-seed{seed}", "landmarks": list(landmarks), "cases": cases}
  io.atomic_write(out_dir / "dataset.json", json.dumps(manifest, indent=2) + "\n")
  build_info = {"source": "MNI152NLin2009cAsym template + AFIDs consensus", "modality": modality,
                "seed": seed, "elastic": elastic, "constant_baseline_test": baseline, "cases": info}
  io.atomic_write(out_dir / "build_info.json", json.dumps(build_info, indent=1) + "\n")
  log(f"constant baseline (mean training position) on the test split: {baseline['mean_mm']:.2f} mm mean, "
      f"{baseline['median_mm']:.2f} mm median radial error")
  return out_dir / "dataset.json"


def constant_baseline(info: list[dict], landmarks) -> dict:
  """Radial error (mm) on the test split of predicting each landmark's mean training position."""
  train = np.array([c["points_mm"] for c in info if c["split"] == "train"])
  test = np.array([c["points_mm"] for c in info if c["split"] == "test"])
  errors = np.linalg.norm(test - train.mean(axis=0), axis=-1)  # (cases, K)
  return {"mean_mm": float(errors.mean()), "std_mm": float(errors.std()), "median_mm": float(np.median(errors)),
          "per_landmark_mean_mm": dict(zip(landmarks, np.round(errors.mean(axis=0), 3).tolist()))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m locnet_jax.data.afids", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num-train", type=int, default=48)
  parser.add_argument("--num-val", type=int, default=8)
  parser.add_argument("--num-test", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=None, help="processes writing cases (default: CPU cores)")
  parser.add_argument("--landmarks", default=",".join(AFID_NAMES), help="comma-separated AFID acronyms")
  parser.add_argument("--modality", choices=("T1w", "T2w"), default="T1w")
  parser.add_argument("--elastic", action="store_true", help="add a mild smooth elastic warp")
  parser.add_argument("--source", help=f"folder with the template files, or 'wheel' (default: ${SOURCE_ENV} "
                      "if set, else the wheel)")
  parser.add_argument("--cache-dir", type=Path, help="where the wheel is kept (default ~/.cache/locnet_jax)")
  args = parser.parse_args(argv)
  try:
    build(args.out, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test, seed=args.seed,
          landmarks=parse_names(args.landmarks), modality=args.modality,
          elastic=args.elastic, source=args.source if args.source in (None, "wheel") else Path(args.source),
          cache_dir=args.cache_dir, workers=args.workers)
  except (io.DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())


def rater_errors(build_dir, *, split: str = "test", source: Path | None = None) -> dict[str, np.ndarray]:
  """The human error floor: each expert's own AFIDs against the consensus, on a built data set's split.

  Both point sets are moved by each case's world transform (build_info.json), exactly as the case's
  landmarks were. Returns {rater file stem: radial errors (cases, K) mm} for the set's K landmarks, read
  from `<source>/raters/*.fcsv` (default: the copies shipped in `RESOURCES`; the wheels lack them).
  """
  build_dir, source = Path(build_dir), Path(source or RESOURCES)
  info = json.loads((build_dir / "build_info.json").read_text())
  if info.get("elastic"):
    raise ValueError(f"{build_dir}: elastic warps are not stored; rater errors need an affine-only build")
  names = json.loads((build_dir / "dataset.json").read_text())["landmarks"]
  index = [AFID_NAMES.index(n) for n in names]
  consensus = parse_afids((source / FILES["afids"][0]).read_bytes())[index]
  transforms = [np.asarray(c["transform_world"]) for c in info["cases"] if c["split"] == split]
  out = {}
  for path in sorted((source / "raters").glob("*.fcsv")):
    rater = parse_afids(path.read_bytes())[index]
    out[path.name.split("_desc-")[-1].split("_")[0]] = np.stack(
        [np.linalg.norm(geometry.apply_affine(t, rater) - geometry.apply_affine(t, consensus), axis=-1)
         for t in transforms])
  return out
