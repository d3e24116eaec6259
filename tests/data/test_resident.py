"""The training set on the device yields the host loader's batches, in its order, on the mesh."""

import jax
import numpy as np
import pytest

from locnet_jax import parallel
from locnet_jax.data import loader, preprocess, resident


def _examples(count, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = rng.uniform(-5, 5, 3)
    fine = rng.uniform(0, 1, (8, 6, 4)).astype(np.float16).astype(np.float32)  # as the cache stores them
    pyramid = preprocess.Pyramid((fine[::2, ::2, ::2].copy(), fine), (affine @ np.diag([2, 2, 2, 1.0]), affine))
    out.append(loader.Example(f"c{i}", pyramid, rng.uniform(-10, 10, (3, 3))))
  return out


def test_batches_equal_the_host_loaders_in_order_and_value():
  examples = _examples(7)
  mesh = parallel.data_mesh(batch_size=2)
  data = resident.ResidentData(examples, batch_size=2, seed=3, mesh=mesh)
  assert data.steps_per_epoch() == 3 and data.nbytes > 7 * 8 * 6 * 4 * 2
  with loader.Loader(examples, batch_size=2, seed=3, augment=None, workers=0) as host_loader:
    for epoch in (0, 1):
      host = list(host_loader.epoch(epoch))
      ours = list(data.epoch(epoch))
      assert len(ours) == len(host) == 3
      for a, b in zip(ours, host):
        assert isinstance(a["target_mm"], jax.Array) and a["volumes"][1].dtype == np.float32
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), b)
  first, second = (np.asarray(next(data.epoch(e))["target_mm"]) for e in (0, 1))
  assert not np.array_equal(first, second)  # each epoch its own order


def test_mismatched_pyramids_are_refused_by_name():
  examples = _examples(2)
  small = examples[1].pyramid
  examples[1] = loader.Example("odd", preprocess.Pyramid((small.volumes[0][:2], small.volumes[1]), small.affines),
                                 examples[1].target_mm)
  with pytest.raises(ValueError, match="case odd: level 0 has shape"):
    resident.ResidentData(examples, batch_size=1, seed=0, mesh=parallel.data_mesh(batch_size=1))
