"""The input pipeline: preprocess each image once into a disk cache, then augment ahead of the device.

Cache: one ``.npz`` per (image, preprocessing settings), named by a hash of the image file's bytes and
the settings, so editing either makes a new entry (and a stale one is never read). Writes are atomic.
Loader: epoch batches whose augmentation is drawn from ``np.random.default_rng((seed, epoch, index))``
and computed in background worker processes while the device trains on the previous batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as _io
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Iterator, Sequence
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

from locnet_jax import dataset, io, outputs, parallel
from locnet_jax.data import augment_host, preprocess

CACHE_VERSION = 1  # bump when preprocessing code changes what it produces
SHM_PREFIX = "locnet_"  # shared-memory blocks of the loader's workers: locnet_<training PID>_<random>
SHM_DIR = Path("/dev/shm")  # where Linux keeps them
ORPHAN_AGE_S = 6 * 3600  # a block lives for a few batches; one this old whose run is gone was left by a kill


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
  spacings_mm: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)  # coarse to fine
  finest_size: int = 448
  intensity: str = "mr"  # "ct", "mr" or "none"
  ct_window_hu: tuple[float, float] = (-1000.0, 1000.0)
  mr_percentiles: tuple[float, float] = (0.5, 99.5)
  storage_dtype: str = "float16"  # cache storage; float16 halves disk use of [0, 1] images
  outside_value: float = 0.0  # the grid outside the image (< 0 marks it: `preprocess.split_outside`)


@dataclasses.dataclass(frozen=True)
class Example:
  """One case ready for the model: its pyramid, landmarks (K, 3) RAS mm (NaN rows if missing or absent)
  and presence (K,): 1 in the image, 0 absent (cut away), NaN unknown; None: every annotated landmark
  is in the image (what a data set on disk says). `grid`: the original image's voxel grid (voxel->RAS
  affine (4, 4), shape (3,)), i.e. its field of view, which prediction reads presence against
  (`eval/qc.py`); None where there is no such image (synthetic and augmented cases)."""

  case_id: str
  pyramid: preprocess.Pyramid
  target_mm: np.ndarray
  present: np.ndarray | None = None
  grid: tuple[np.ndarray, tuple[int, int, int]] | None = None

  def presence(self) -> np.ndarray:
    """(K,) float: `present`, or 1 for each annotated landmark and NaN for the others."""
    if self.present is not None:
      return np.asarray(self.present, np.float64)
    return np.where(np.all(np.isfinite(self.target_mm), axis=-1), 1.0, np.nan)


def _file_digest(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def cache_key(image: Path, settings: PreprocessSettings) -> str:
  recipe = dataclasses.asdict(settings)
  if recipe["outside_value"] == 0:  # the default: caches written before the field existed stay valid
    del recipe["outside_value"]
  payload = json.dumps({"image": _file_digest(image), "settings": recipe,
                        "version": CACHE_VERSION}, sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:24]


MAX_SPACING_MM = 10.0  # coarser voxels than this along any axis: not an image a landmark model can read
MIN_EXTENT_MM = 16.0  # an image narrower than this along any axis holds no anatomy worth locating


def check_image_geometry(volume: io.Volume, path) -> None:
  """Sanity limits on an image's voxel spacing and field of view: a `io.DataError` naming the file."""
  spacing, shape = volume.spacing_mm, np.asarray(volume.data.shape)
  rounded = tuple(round(float(s), 3) for s in spacing)
  if np.any(spacing > MAX_SPACING_MM):
    raise io.DataError(path, f"voxel spacing {rounded} mm exceeds {MAX_SPACING_MM:g} mm along an axis")
  if np.any(spacing * shape < MIN_EXTENT_MM):
    raise io.DataError(path, f"the image covers only {tuple(round(float(e), 1) for e in spacing * shape)} mm "
                       f"(shape {tuple(int(n) for n in shape)}, spacing {rounded} mm): under {MIN_EXTENT_MM:g} mm "
                       "along an axis")


def compute_pyramid(image: Path, settings: PreprocessSettings) -> preprocess.Pyramid:
  """The image's pyramid (`preprocess.build_pyramid` of its normalised intensities); bad images are a
  `io.DataError` naming the file."""
  volume = io.load_volume(image)
  check_image_geometry(volume, image)
  try:
    data = preprocess.normalize_intensity(volume.data, mode=settings.intensity, ct_window_hu=settings.ct_window_hu,
                                          mr_percentiles=settings.mr_percentiles)
  except ValueError as error:
    raise io.DataError(image, f"cannot normalise its intensities ({error}): is it almost constant?") from None
  return preprocess.build_pyramid(data, volume.affine, spacings_mm=settings.spacings_mm,
                                  finest_size=settings.finest_size, outside_value=settings.outside_value)


def load_pyramid(image: Path, settings: PreprocessSettings, cache_dir: Path | None) -> preprocess.Pyramid:
  """The image's pyramid from the cache, computing and storing it on a miss (no cache if None)."""
  if cache_dir is None:
    return compute_pyramid(image, settings)
  path = Path(cache_dir) / f"{Path(image).name.split('.')[0]}-{cache_key(image, settings)}.npz"
  if path.is_file():
    with np.load(path) as f:
      count = int(f["count"])
      return preprocess.Pyramid(tuple(f[f"volume{s}"].astype(np.float32) for s in range(count)),
                                tuple(f[f"affine{s}"] for s in range(count)))
  pyramid = compute_pyramid(image, settings)
  arrays = {"count": np.array(len(pyramid.volumes))}
  for s, (v, a) in enumerate(zip(pyramid.volumes, pyramid.affines)):
    arrays[f"volume{s}"] = v.astype(settings.storage_dtype)
    arrays[f"affine{s}"] = a
  buffer = _io.BytesIO()
  np.savez(buffer, **arrays)
  io.atomic_write(path, buffer.getvalue())
  return load_pyramid(image, settings, cache_dir)  # what training reads is exactly what is stored


def load_example(case: dataset.Case, names: Sequence[str], settings: PreprocessSettings,
                 cache_dir: Path | None, *, check: bool = True) -> Example:
  """A manifest case as an Example; with `check`, its landmarks must lie inside its image (this reads
  the image once more, so the loader's workers skip it for cases checked when the data were loaded)."""
  target = np.full((len(names), 3), np.nan)
  if case.landmarks is not None:
    target = io.load_landmarks(case.landmarks, names)
    if check:
      io.check_landmarks_in_image(target, names, io.load_volume(case.image), case.landmarks)
  present = None
  if case.absent:
    absent, placed = np.isin(np.asarray(names), case.absent), np.all(np.isfinite(target), axis=-1)
    if np.any(absent & placed):
      raise io.DataError(case.landmarks, f"case {case.id!r} lists as absent landmarks its file places: "
                         f"{[n for n, a, p in zip(names, absent, placed) if a and p]}")
    present = np.where(absent, 0.0, np.where(placed, 1.0, np.nan))
  return Example(case.id, load_pyramid(case.image, settings, cache_dir), target, present, io.load_grid(case.image))


def _prepare(case: dataset.Case, names: Sequence[str], settings: PreprocessSettings, cache_dir: Path) -> None:
  load_example(case, names, settings, cache_dir)


def prepare_cases(cases: Sequence[dataset.Case], names: Sequence[str], settings: PreprocessSettings, cache_dir: Path,
                  *, workers: int) -> None:
  """Checks every case (images, landmarks inside them) and fills the pyramid cache, in `workers` processes.

  Raises the first case's `io.DataError`, in manifest order, whatever the worker count (0: in this process);
  a cache folder that cannot be written, before any work.
  """
  outputs.check_writable(cache_dir)
  if workers <= 0 or len(cases) < 2:
    for case in cases:
      _prepare(case, names, settings, cache_dir)
    return
  with parallel.process_pool(min(workers, len(cases))) as pool:
    futures = [pool.submit(_prepare, case, tuple(names), settings, cache_dir) for case in cases]
    for future in futures:
      future.result()


@dataclasses.dataclass(frozen=True)
class CachedCase:
  """A case the loader's workers read themselves (from the pyramid cache), so no pyramid is ever pickled."""

  case: dataset.Case
  names: tuple[str, ...]
  settings: PreprocessSettings
  cache_dir: Path

  def __call__(self) -> Example:
    return load_example(self.case, self.names, self.settings, self.cache_dir, check=False)


@dataclasses.dataclass(frozen=True)
class InMemory:
  """An example held in memory (pickled to each worker that needs it: fine for small data)."""

  example: Example

  def __call__(self) -> Example:
    return self.example


def _augmented(source, seed_triple, settings) -> Example:
  example = source()
  if settings is None:
    return example
  out = augment_host.augment_case(example.pyramid, example.target_mm, np.random.default_rng(seed_triple), settings)
  return Example(example.case_id, out.pyramid, out.target_mm, out.present)


def create_shared_block(name: str, *, size: int) -> shared_memory.SharedMemory:
  """A new shared-memory block, registered with the run's resource tracker BEFORE it exists.

  `SharedMemory(create=True)` registers only after creating (and sizing and mapping) the block: a worker
  killed in between (its trainer killed, `parallel.die_with_parent`) left a block nobody would unlink.
  Registered first, the tracker unlinks it once the run is gone (a name never created is skipped with a
  warning on stderr); the reader's `unlink` unregisters it. Double registration is harmless (a set).
  """
  if os.name == "posix":
    resource_tracker.register(f"/{name}", "shared_memory")  # the name SharedMemory itself registers
  return shared_memory.SharedMemory(create=True, size=size, name=name)


def sweep_orphaned_blocks(*, shm_dir: Path = SHM_DIR, older_than_s: float = ORPHAN_AGE_S) -> int:
  """Deletes loader blocks older than `older_than_s` whose run (the PID in the name) is not running; the
  bytes freed.

  The resource tracker frees a killed run's blocks unless it is killed too (SIGKILL to the whole
  process group: a scheduler's time limit, a closed session); those would hold memory until reboot.
  The age keeps a run in another PID namespace that shares the folder safe (its blocks live seconds).
  """
  freed = 0
  for path in shm_dir.glob(f"{SHM_PREFIX}*_*") if shm_dir.is_dir() else ():
    pid = path.name[len(SHM_PREFIX):].split("_", 1)[0]
    try:
      stat = path.stat()
      if not pid.isdigit() or Path(f"/proc/{pid}").exists() or time.time() - stat.st_mtime < older_than_s:
        continue
      path.unlink()
    except OSError:  # gone meanwhile, or not ours to delete
      continue
    freed += stat.st_size
  return freed


def _augmented_in_shared_memory(source, seed_triple, settings):
  """In a worker: the augmented example with its volumes in one shared-memory block (not pickled)."""
  example = _augmented(source, seed_triple, settings)
  volumes = example.pyramid.volumes
  block = create_shared_block(f"{SHM_PREFIX}{os.getppid()}_{secrets.token_hex(8)}",
                              size=max(1, sum(v.nbytes for v in volumes)))
  offset, layout = 0, []
  for v in volumes:
    np.ndarray(v.shape, v.dtype, buffer=block.buf, offset=offset)[...] = v
    layout.append((v.shape, v.dtype.str, offset))
    offset += v.nbytes
  block.close()
  return block.name, layout, example.pyramid.affines, example.target_mm, example.case_id, example.present


class _FromSharedMemory:
  """A pending worker result; `result()` copies the volumes out of shared memory and frees it."""

  def __init__(self, future):
    self._future = future

  def result(self) -> Example:
    name, layout, affines, target, case_id, present = self._future.result()
    block = shared_memory.SharedMemory(name=name)
    try:
      volumes = tuple(np.ndarray(shape, dtype, buffer=block.buf, offset=offset).copy()
                      for shape, dtype, offset in layout)
    finally:
      block.close()
      block.unlink()
    return Example(case_id, preprocess.Pyramid(volumes, affines), target, present)


def collate(examples: Sequence[Example]) -> dict:
  """A batch as NumPy arrays: volumes/affines per scale (B, ...), target_mm (B, K, 3), present (B, K)
  (`Example.presence`), float32."""
  count = len(examples[0].pyramid.volumes)
  return {"volumes": [np.stack([e.pyramid.volumes[s] for e in examples]).astype(np.float32) for s in range(count)],
          "affines": [np.stack([e.pyramid.affines[s] for e in examples]).astype(np.float32) for s in range(count)],
          "target_mm": np.stack([e.target_mm for e in examples]).astype(np.float32),
          "present": np.stack([e.presence() for e in examples]).astype(np.float32)}


def epoch_batches(*, seed: int, epoch: int, count: int, batch_size: int) -> list[np.ndarray]:
  """The case indices of each batch of an epoch: ``default_rng((seed, epoch)).permutation(count)`` cut
  into full batches (the remainder is dropped)."""
  order = np.random.default_rng((seed, epoch)).permutation(count)
  return [order[i:i + batch_size] for i in range(0, count // batch_size * batch_size, batch_size)]


class Loader:
  """Shuffled, augmented training batches, prepared by `workers` background processes (0: inline).

  `sources` are `CachedCase`s (workers read the cache themselves) or `Example`s (held in memory).
  `epoch(e)` yields the batches of epoch e; at most `prefetch` batches are in flight. The result depends
  only on (seed, epoch, case order), never on timing or the number of workers.
  """

  def __init__(self, sources: Sequence, *, batch_size: int, seed: int,
               augment: augment_host.AugmentSettings | None, workers: int = 1, prefetch: int = 2):
    if not sources:
      raise ValueError("the loader needs at least one example")
    self.sources = [InMemory(s) if isinstance(s, Example) else s for s in sources]
    self.batch_size, self.seed = batch_size, seed
    self.augment, self.prefetch = augment, max(1, prefetch)
    self._pool = parallel.process_pool(workers) if workers > 0 else None

  def steps_per_epoch(self) -> int:
    return len(self.sources) // self.batch_size

  def _job(self, epoch: int, indices):
    jobs = [(self.sources[i], (self.seed, epoch, int(i)), self.augment) for i in indices]
    if self._pool is None:
      return _ready([_augmented(*job) for job in jobs])
    return [_FromSharedMemory(self._pool.submit(_augmented_in_shared_memory, *job)) for job in jobs]

  def epoch(self, epoch: int) -> Iterator[dict]:
    pending = deque()
    for indices in epoch_batches(seed=self.seed, epoch=epoch, count=len(self.sources), batch_size=self.batch_size):
      pending.append(self._job(epoch, indices))
      if len(pending) > self.prefetch:
        yield collate([f.result() for f in pending.popleft()])
    while pending:
      yield collate([f.result() for f in pending.popleft()])

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _Done:
  def __init__(self, value):
    self._value = value

  def result(self):
    return self._value


def _ready(values):
  return [_Done(v) for v in values]
