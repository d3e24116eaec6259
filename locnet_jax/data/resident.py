"""The training set held on the accelerator, so a step needs no host work (`train.data_on`).

With augmentation on the device (`augment_device`), the host's loader is the last thing between a GPU
and its next step: reading, collating and copying a 448^3 pyramid takes far longer on the CPU than a
training step on a GPU (docs/performance.md, "feeding the device"). Here every training pyramid is
stacked per scale once, (N, X_s, Y_s, Z_s), in `storage_dtype` (float16 for cached data sets: their
cache already stores float16, so nothing is lost), and replicated on the devices of the mesh; a batch is a jitted gather
of its indices, cast to float32, laid out over the mesh's data axis. The epoch order is the host
loader's (`loader.epoch_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from locnet_jax import parallel
from locnet_jax.data import loader


def _stacked(sources: Sequence, storage_dtype: str) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray,
                                                               np.ndarray]:
  """Stacks examples (or callables returning them) one at a time: host memory ~ the stack + one example.
  Returns (volumes per level, affines per level, targets (N, K, 3), presence (N, K))."""
  volumes = affines = None
  targets, present = [], []
  for i, source in enumerate(sources):
    example = source if isinstance(source, loader.Example) else source()
    if volumes is None:
      volumes = [np.empty((len(sources), *v.shape), storage_dtype) for v in example.pyramid.volumes]
      affines = [np.empty((len(sources), 4, 4), np.float32) for _ in example.pyramid.volumes]
    for s, (v, a) in enumerate(zip(example.pyramid.volumes, example.pyramid.affines)):
      if v.shape != volumes[s].shape[1:]:
        raise ValueError(f"case {example.case_id}: level {s} has shape {v.shape}, others {volumes[s].shape[1:]}")
      volumes[s][i], affines[s][i] = v, a
    targets.append(np.asarray(example.target_mm, np.float32))
    present.append(example.presence().astype(np.float32))
  return volumes, affines, np.stack(targets), np.stack(present)


def _gather(volumes, affines, target, present, indices) -> dict:
  return {"volumes": [jnp.take(v, indices, axis=0).astype(jnp.float32) for v in volumes],
          "affines": [jnp.take(a, indices, axis=0) for a in affines],
          "target_mm": jnp.take(target, indices, axis=0), "present": jnp.take(present, indices, axis=0)}


class ResidentData:
  """Training examples on the device; `epoch(e)` yields the batches `loader.Loader.epoch(e)` would
  (without host augmentation), already on the devices of `mesh`."""

  def __init__(self, sources: Sequence, *, batch_size: int, seed: int, mesh, storage_dtype: str = "float16"):
    if not sources:
      raise ValueError("resident data needs at least one example")
    if jax.process_count() > 1:
      raise ValueError("resident data runs in a single process (each process would hold the whole set)")
    self.batch_size, self.seed, self.count = batch_size, seed, len(sources)
    replicated = parallel.replicated(mesh)
    self._arrays = jax.device_put(_stacked(sources, storage_dtype), replicated)
    self._take = jax.jit(_gather, out_shardings=parallel.batch_sharded(mesh))

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self._arrays))

  def steps_per_epoch(self) -> int:
    return self.count // self.batch_size

  def epoch(self, epoch: int) -> Iterator[dict]:
    for indices in loader.epoch_batches(seed=self.seed, epoch=epoch, count=self.count, batch_size=self.batch_size):
      yield self._take(*self._arrays, jnp.asarray(indices, jnp.int32))

  def close(self) -> None:
    self._arrays = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
