"""Which images a prediction run reads and where each one's files go: files, folders and globs, or a BIDS
data set; `--shard=i/n` splits a cohort with no coordination; an image whose files are all written is done.

Two layouts (docs/data_format.md, "Predictions"):

- plain (`images`): every image's files in one folder, named by its case id (the file name without
  `.nii.gz` / `.nii`): `<case>.mrk.json`, `<case>.csv`;
- BIDS (`bids_jobs`): each subject's (and session's) T1w images, `sub-XX/[ses-YY/]anat/*_T1w.nii[.gz]`,
  written as a derivative data set, `OUT/sub-XX/[ses-YY/]anat/<entities>_desc-locnet_afids.{fcsv,mrk.json,csv}`
  where <entities> is the image's name without `_T1w.nii.gz` (e.g. `sub-01_ses-pre_run-1`).

A job is done when all its files exist: each is written atomically, the CSV last, so a run killed mid-image
leaves that image not done, and a rerun predicts it again and skips the rest.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import re
from pathlib import Path
from typing import Sequence

from locnet_jax import io, outputs
from locnet_jax.io import DataError

BIDS_SUFFIX = "_desc-locnet_afids"
_GLOB = re.compile(r"[*?\[]")
_BIDS_T1W = re.compile(r"^(sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")


@dataclasses.dataclass(frozen=True)
class Job:
  """One image to predict: the file read, its case id (the CSVs' `case_id`) and the files written."""

  image: Path
  case_id: str
  folder: Path  # where its files go
  stem: str  # their common name: <stem>.mrk.json, <stem>.csv (and <stem>.fcsv in the BIDS layout)
  fcsv: bool = False

  @property
  def files(self) -> dict[str, Path]:
    names = {"mrk": f"{self.stem}.mrk.json", "csv": f"{self.stem}.csv"}
    if self.fcsv:
      names["fcsv"] = f"{self.stem}.fcsv"
    return {kind: self.folder / name for kind, name in names.items()}

  def done(self) -> bool:
    return all(path.is_file() for path in self.files.values())


def find_images(specs: Sequence[str]) -> list[Path]:
  """The NIfTI files `specs` name, in order, each once: a file; a folder (its `*.nii` and `*.nii.gz`, sorted,
  not recursive); or a glob pattern (`*`, `?`, `[...]`; its matches sorted). A path that does not exist, a
  pattern that matches nothing or a folder with no NIfTI is a `DataError` naming it."""
  found: list[Path] = []
  for spec in specs:
    spec = str(spec).strip()
    if not spec:
      continue
    path = Path(spec).expanduser()
    if path.is_dir():
      matches = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(outputs.NIFTI_SUFFIXES))
      if not matches:
        raise DataError(path, "a folder with no .nii or .nii.gz file")
    elif path.exists():
      matches = [path]
    elif _GLOB.search(spec):
      matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
      if not matches:
        raise DataError(spec, "the pattern matches no file")
    else:
      raise DataError(path, "no such file")
    found.extend(matches)
  unique = list({p.resolve(): p for p in found}.values())  # first occurrence of each file, in order
  if not unique:
    raise DataError("--image", "no images given")
  return unique


def plain_jobs(images: Sequence[Path], out: Path) -> list[Job]:
  """The plain layout: every image's files in `out`, named by its case id (two images with one id: error)."""
  ids = outputs.case_ids_from_paths(images)
  return [Job(Path(image), case_id, Path(out), case_id) for image, case_id in zip(images, ids)]


def _labels(participant_labels: Sequence[str] | None) -> set[str] | None:
  if not participant_labels:
    return None
  return {label.strip().removeprefix("sub-") for label in participant_labels if label.strip()}


def bids_jobs(bids_dir: Path, out: Path, *, participant_labels: Sequence[str] | None = None) -> list[Job]:
  """Each T1w of a BIDS data set (`sub-*/anat/` and `sub-*/ses-*/anat/`), sorted by path, as jobs writing the
  derivative layout under `out`; `participant_labels` ("01" or "sub-01") keeps those subjects, each of
  which must exist. A folder with no subject, or no T1w among the chosen ones, is a `DataError`."""
  bids_dir = Path(bids_dir)
  if not bids_dir.is_dir():
    raise DataError(bids_dir, "not a folder (a BIDS data set: sub-*/[ses-*/]anat/*_T1w.nii.gz)")
  subjects = sorted(p for p in bids_dir.glob("sub-*") if p.is_dir())
  if not subjects:
    raise DataError(bids_dir, "no sub-* folder: not a BIDS data set")
  wanted = _labels(participant_labels)
  if wanted is not None:
    unknown = sorted(wanted - {s.name.removeprefix("sub-") for s in subjects})
    if unknown:
      raise DataError(bids_dir, f"no subject {', '.join('sub-' + u for u in unknown)}")
    subjects = [s for s in subjects if s.name.removeprefix("sub-") in wanted]
  jobs = []
  for subject in subjects:
    for anat in sorted([subject / "anat", *(p / "anat" for p in sorted(subject.glob("ses-*")) if p.is_dir())]):
      for image in sorted(anat.glob("*_T1w.nii*")) if anat.is_dir() else []:
        match = _BIDS_T1W.match(image.name)
        if match is None:
          continue  # e.g. a .json sidecar or an oddly named file: not a BIDS T1w image
        entities = match.group(1)
        folder = Path(out) / anat.relative_to(bids_dir)
        jobs.append(Job(image, entities, folder, entities + BIDS_SUFFIX, fcsv=True))
  if not jobs:
    raise DataError(bids_dir, "no T1w image (sub-*/[ses-*/]anat/*_T1w.nii[.gz])" +
                    (" among the chosen participants" if wanted is not None else ""))
  return jobs


def parse_shard(value: str | None) -> tuple[int, int]:
  """"i/n" (0-based: shard i of n) -> (i, n); None or "" -> (0, 1). Anything else: a `DataError`."""
  if not value:
    return 0, 1
  match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
  if match is None or not 0 <= int(match.group(1)) < int(match.group(2)):
    raise DataError("--shard", f"{value!r} is not i/n with 0 <= i < n (e.g. 0/4 ... 3/4)")
  return int(match.group(1)), int(match.group(2))


def shard(jobs: Sequence[Job], index: int, count: int) -> list[Job]:
  """Shard `index` of `count`: every count-th job from the index-th, in the jobs' (sorted) order. The shards
  of one cohort partition it: every job in exactly one."""
  return list(jobs[index::count])


def summary_csv_name(index: int, count: int) -> str:
  """The run's combined CSV: `predictions.csv`, or per shard `predictions_shard-<i>of<n>.csv` (shards run
  at once never write one file)."""
  return "predictions.csv" if count == 1 else f"predictions_shard-{index}of{count}.csv"


def write_dataset_description(out: Path, *, source: Path, model: Path, version: str) -> None:
  """The derivative data set's `dataset_description.json` (BIDS 1.9), written once (shards write the same)."""
  path = Path(out) / "dataset_description.json"
  if path.is_file():
    return
  doc = {"Name": "locnet_jax anatomical fiducial predictions", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "locnet_jax", "Version": version, "Description": f"model {model}"}],
         "SourceDatasets": [{"URL": Path(source).resolve().as_uri()}]}
  io.atomic_write(path, json.dumps(doc, indent=2) + "\n")
