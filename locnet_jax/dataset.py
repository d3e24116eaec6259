"""The data set manifest users hand us (`dataset.json`, docs/data_format.md): landmark names, cases, splits.

Paths in the manifest are relative to its folder and become absolute on loading; every file it names
must exist. Every problem raises `io.DataError` naming the manifest and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from locnet_jax.io import DataError
from locnet_jax.outputs import check_case_id

SPLITS = ("train", "val", "test")
MANIFEST_KEYS = ("name", "description", "landmarks", "cases")
CASE_KEYS = ("id", "image", "landmarks", "split", "absent")

@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  image: Path  # absolute
  landmarks: Path | None  # absolute, None for cases without annotations
  split: str
  absent: tuple[str, ...] = ()  # landmarks known to lie outside the image (a partial field of view)


@dataclasses.dataclass(frozen=True)
class Manifest:
  path: Path
  name: str
  landmarks: tuple[str, ...]
  cases: tuple[Case, ...]

  def split(self, split: str) -> tuple[Case, ...]:
    """The cases of one split; an empty split is an error."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cases = tuple(c for c in self.cases if c.split == split)
    if not cases:
      raise DataError(self.path, f"the {split!r} split has no cases")
    return cases


def load_manifest(path) -> Manifest:
  """Reads and validates a `dataset.json` (docs/data_format.md); paths become absolute, files must exist."""
  path = Path(path).resolve()
  if path.is_dir():
    path = path / "dataset.json"
  if not path.is_file():
    raise DataError(path, "no such file")
  try:
    doc = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(path, f"malformed JSON ({e})") from None
  if not isinstance(doc, dict):
    raise DataError(path, "the manifest must be a JSON object")
  unknown = sorted(set(doc) - set(MANIFEST_KEYS))
  if unknown:  # a misspelt key would silently be ignored
    raise DataError(path, f"unknown keys {unknown}; allowed: {list(MANIFEST_KEYS)}")
  names = doc.get("landmarks")
  if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
    raise DataError(path, "'landmarks' must be a non-empty list of landmark names")
  if len(set(names)) != len(names):
    raise DataError(path, f"'landmarks' repeats names: {sorted({n for n in names if names.count(n) > 1})}")
  cases = doc.get("cases")
  if not isinstance(cases, list) or not cases:
    raise DataError(path, "'cases' must be a non-empty list")
  out, ids = [], set()
  for i, case in enumerate(cases):
    if not isinstance(case, dict) or not isinstance(case.get("id"), str) or not isinstance(case.get("image"), str):
      raise DataError(path, f"case {i} needs string 'id' and 'image' fields")
    unknown = sorted(set(case) - set(CASE_KEYS))
    if unknown:  # "spilt": "test" would otherwise train on a test case
      raise DataError(path, f"case {case['id']!r} has unknown keys {unknown}; allowed: {list(CASE_KEYS)}")
    check_case_id(case["id"], path)
    if case["id"] in ids:
      raise DataError(path, f"case id {case['id']!r} appears more than once")
    ids.add(case["id"])
    split = case.get("split", "train")
    if split not in SPLITS:
      raise DataError(path, f"case {case['id']!r} has split {split!r}; expected one of {SPLITS}")
    image = (path.parent / case["image"]).resolve()
    if not image.is_file():
      raise DataError(path, f"case {case['id']!r}: image file {case['image']!r} does not exist")
    landmarks = case.get("landmarks")
    if landmarks is not None:
      if not isinstance(landmarks, str):
        raise DataError(path, f"case {case['id']!r}: 'landmarks' must be a path")
      landmarks = (path.parent / landmarks).resolve()
      if not landmarks.is_file():
        raise DataError(path, f"case {case['id']!r}: landmark file {case['landmarks']!r} does not exist")
    absent = case.get("absent", [])
    if not isinstance(absent, list) or not all(isinstance(n, str) for n in absent):
      raise DataError(path, f"case {case['id']!r}: 'absent' must be a list of landmark names")
    unknown = [n for n in absent if n not in names]
    if unknown:
      raise DataError(path, f"case {case['id']!r}: 'absent' names landmarks the manifest does not: {unknown}")
    out.append(Case(id=case["id"], image=image, landmarks=landmarks, split=split, absent=tuple(absent)))
  return Manifest(path=path, name=str(doc.get("name", path.parent.name)), landmarks=tuple(names),
                  cases=tuple(out))
