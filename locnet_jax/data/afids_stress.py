"""Stress test sets of the AFIDs benchmark: what one template does not show, never trained on.

    python -m locnet_jax.data.afids_stress --out data/afids-stress [--kinds t2w,slab,deform,thick]
        [--num-cases 8] [--seed 1000] [--landmarks AC,PC,...] [--source DIR]

Each kind is its own data set (`<out>/<kind>/dataset.json`, every case in the "test" split), in the
format `afids.build` writes, from random streams ``(seed, kind, case)`` that the benchmark's build
(``(seed, case)``) never draws:

- t2w: the template's T2w (same grid and AFIDs as the T1w), warped as the benchmark's cases are: another
  contrast;
- deform: the T1w under the benchmark's transform plus an inter-subject-sized deformation
  (`variation.random_displacement`: up to `DEFORM_MM` at a 25-50 mm wavelength): another brain's shape;
- thick: the T1w case stored with `THICK_MM` slices along one random voxel axis (a box average over each
  slice, one sample per slice): the anisotropic voxels of thick-slice acquisitions;
- slab: the T1w case cut to an axial or coronal slab 30-60 mm thick around a random landmark (the stored
  image covers only the slab): a partial field of view. Landmarks outside it are absent: left out of the
  landmark file and listed per case in the manifest's "absent" field (docs/data_format.md).

Frames as in `afids`: images in a random storage orientation, landmarks RAS mm in the world frame.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage

from locnet_jax import geometry, io
from locnet_jax.data import afids, augment_host, preprocess, variation

KINDS = ("t2w", "slab", "deform", "thick")
DEFORM_MM = 6.0
THICK_MM = 5.0
SLAB_MM = (30.0, 60.0)


def _deformed_case(template: io.Volume, points_mm: np.ndarray, rng: np.random.Generator) -> dict:
  transform = afids.random_affine_transform(rng)
  orientation = list(afids.ORIENTATIONS)[rng.integers(len(afids.ORIENTATIONS))]
  affine, shape = afids.reoriented_grid(template.affine, template.data.shape, orientation)
  lower, upper = variation.grid_box_mm(affine, shape)
  field = variation.random_displacement(rng, lower_mm=lower, upper_mm=upper, spacing_mm=rng.uniform(25.0, 50.0),
                                        max_mm=DEFORM_MM)
  data = preprocess.resample(template.data, template.affine, target_affine=affine, target_shape=shape,
                             world_map=augment_host.source_points(transform, field))
  return {"data": afids.vary_intensity(data, rng, affine), "affine": affine, "transform": transform,
          "orientation": orientation, "points_mm": augment_host.move_points(points_mm, transform=transform,
                                                                             elastic=field)}


def thick_slices(data: np.ndarray, affine: np.ndarray, *, axis: int, thickness_mm: float):
  """(data, affine) stored with one sample per `thickness_mm` slice along voxel `axis`: the box average
  of each slice's voxels, at the slice's centre."""
  width = max(1, int(round(thickness_mm / geometry.voxel_spacing_mm(affine)[axis])))
  averaged = scipy.ndimage.uniform_filter1d(np.asarray(data, np.float32), width, axis=axis, mode="nearest")
  first = (width - 1) // 2  # the centre of the first whole slice
  index = [slice(None)] * 3
  index[axis] = slice(first, data.shape[axis] - (width - 1 - first), width)
  new_affine = np.array(affine, np.float64)
  new_affine[:3, 3] += affine[:3, axis] * first
  new_affine[:3, axis] *= width
  return averaged[tuple(index)], new_affine


def slab(data: np.ndarray, affine: np.ndarray, *, world_axis: int, lower_mm: float, upper_mm: float):
  """(data, affine) cut to the voxels whose centres lie in [lower_mm, upper_mm] along RAS axis
  `world_axis`; the grid must have one voxel axis along it (every `afids` orientation does)."""
  axis = int(np.argmax(np.abs(affine[world_axis, :3])))
  coords = affine[world_axis, axis] * np.arange(data.shape[axis]) + affine[world_axis, 3]
  inside = np.nonzero((coords >= lower_mm) & (coords <= upper_mm))[0]
  if inside.size == 0:
    raise ValueError(f"the slab [{lower_mm}, {upper_mm}] mm misses the image")
  index = [slice(None)] * 3
  index[axis] = slice(inside[0], inside[-1] + 1)
  new_affine = np.array(affine, np.float64)
  new_affine[:3, 3] += affine[:3, axis] * inside[0]
  return np.ascontiguousarray(data[tuple(index)]), new_affine


def make_stress_case(kind: str, templates: dict, points_mm: np.ndarray, rng: np.random.Generator) -> dict:
  """One case of `kind`: {"data", "affine", "points_mm" (NaN rows absent), "absent" (indices), ...}."""
  if kind == "t2w":
    case = afids.make_case(templates["T2w"], points_mm, rng)
  elif kind == "deform":
    case = _deformed_case(templates["T1w"], points_mm, rng)
  else:
    case = afids.make_case(templates["T1w"], points_mm, rng)
  absent = []
  if kind == "thick":
    axis = int(rng.integers(3))
    case["data"], case["affine"] = thick_slices(case["data"], case["affine"], axis=axis, thickness_mm=THICK_MM)
    case["thick_axis"] = axis
  elif kind == "slab":
    world_axis = int(rng.choice([2, 1]))  # axial (S) or coronal (A)
    thickness = rng.uniform(*SLAB_MM)
    center = case["points_mm"][rng.integers(len(points_mm)), world_axis] + rng.uniform(-0.4, 0.4) * thickness
    lower, upper = center - thickness / 2, center + thickness / 2
    case["data"], case["affine"] = slab(case["data"], case["affine"], world_axis=world_axis, lower_mm=lower,
                                        upper_mm=upper)
    corners = geometry.vox_to_mm(np.array([[0, 0, 0], np.asarray(case["data"].shape) - 1], np.float64), case["affine"])
    lower, upper = corners[:, world_axis].min(), corners[:, world_axis].max()  # the voxel centres kept
    coordinate = case["points_mm"][:, world_axis]
    absent = [int(k) for k in np.nonzero((coordinate < lower) | (coordinate > upper))[0]]
    case["points_mm"] = np.array(case["points_mm"], np.float64)
    case["points_mm"][absent] = np.nan
    case["slab_mm"] = {"world_axis": "RAS"[world_axis], "lower": round(float(lower), 3), "upper": round(float(upper), 3)}
  case["absent"] = absent
  return case


def build_stress(out_dir, *, kinds=KINDS, num_cases: int = 8, seed: int = 1000, landmarks=afids.AFID_NAMES,
                 source=None, cache_dir=None, log=print) -> dict[str, Path]:
  """Writes one data set per kind under `out_dir/<kind>/`; returns {kind: its dataset.json}."""
  unknown = [k for k in kinds if k not in KINDS]
  if unknown or not kinds:
    raise ValueError(f"unknown stress kinds {unknown} (known: {', '.join(KINDS)})")
  if [n for n in landmarks if n not in afids.AFID_NAMES] or not landmarks:
    raise ValueError(f"unknown AFIDs in {list(landmarks)} (known: {', '.join(afids.AFID_NAMES)})")
  if num_cases < 1:
    raise ValueError("num_cases must be >= 1")
  roles = ("T1w", "afids") + (("T2w",) if "t2w" in kinds else ())
  files = afids.read_source_files(source=source, cache_dir=cache_dir, roles=roles)
  templates = {role: afids.load_template(files[role]) for role in roles if role != "afids"}
  points = afids.parse_afids(files["afids"])[[afids.AFID_NAMES.index(n) for n in landmarks]]
  written = {}
  for kind in kinds:
    folder = Path(out_dir) / kind
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "landmarks").mkdir(parents=True, exist_ok=True)
    cases, info = [], []
    for i in range(num_cases):
      case = make_stress_case(kind, templates, points, np.random.default_rng((seed, KINDS.index(kind), i)))
      case_id = f"{kind}{i:03d}"
      afids.save_int16(folder / "images" / f"{case_id}.nii.gz", case["data"], case["affine"])
      io.write_mrk_json(folder / "landmarks" / f"{case_id}.mrk.json", list(landmarks), case["points_mm"],
                        coordinate_system="LPS")
      entry = {"id": case_id, "image": f"images/{case_id}.nii.gz", "landmarks": f"landmarks/{case_id}.mrk.json",
               "split": "test"}
      if case["absent"]:
        entry["absent"] = [landmarks[k] for k in case["absent"]]
      cases.append(entry)
      record = {"id": case_id, "orientation": case["orientation"], "absent": [landmarks[k] for k in case["absent"]],
                "transform_world": np.round(case["transform"], 8).tolist()}
      record.update({k: case[k] for k in ("thick_axis", "slab_mm") if k in case})
      info.append(record)
      log(f"{kind}: {case_id} written" + (f" ({len(case['absent'])} absent)" if case["absent"] else ""))
    manifest = {"name": f"afids-stress-{kind}-seed{seed}", "landmarks": list(landmarks), "cases": cases}
    io.atomic_write(folder / "dataset.json", json.dumps(manifest, indent=2) + "\n")
    io.atomic_write(folder / "build_info.json", json.dumps({"kind": kind, "seed": seed, "cases": info}, indent=1) + "\n")
    written[kind] = folder / "dataset.json"
  return written


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m locnet_jax.data.afids_stress", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder (one sub-folder per kind)")
  parser.add_argument("--kinds", default=",".join(KINDS))
  parser.add_argument("--num-cases", type=int, default=8)
  parser.add_argument("--seed", type=int, default=1000)
  parser.add_argument("--landmarks", default=",".join(afids.AFID_NAMES), help="comma-separated AFID acronyms")
  parser.add_argument("--source", help=f"folder with the template files (default: ${afids.SOURCE_ENV}, else the wheel)")
  args = parser.parse_args(argv)
  try:
    build_stress(args.out, kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
                 num_cases=args.num_cases, seed=args.seed,
                 landmarks=afids.parse_names(args.landmarks),
                 source=Path(args.source) if args.source else None)
  except (io.DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
