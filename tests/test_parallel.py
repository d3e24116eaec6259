"""Data parallelism: the step on a 4-device mesh equals the single-device step."""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

_SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from tests import helpers
from locnet_jax import parallel
from locnet_jax.data import loader
from locnet_jax.data import synthetic
from locnet_jax.train import steps
from locnet_jax.model.locnet import MultiScaleLocNet
cases = [synthetic.make_case(np.random.default_rng(i), spacings_mm=(8.0, 4.0), finest_size=16, num_landmarks=2)
         for i in range(4)]
batch = loader.collate(cases)
model = MultiScaleLocNet(2, num_scales=2, patch_shape=(8, 8, 8), unet=dict(depth=1, base_channels=4), patch_groups=1)
out = {}
for count in (1, 4):
  mesh = parallel.data_mesh(batch_size=4, devices=jax.devices()[:count])
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=batch["volumes"],
                                      affines=batch["affines"], learning_rate=1e-2)
  state = parallel.replicate(state, mesh)
  step = jax.jit(steps.train_step)
  for i in range(3):
    sharded = parallel.shard_batch(batch, mesh)
    state, metrics = step(state, sharded, jax.random.key(i), weights=jnp.array([0.5, 1.0]))
  leaf = jax.tree.leaves(state.params)[0]
  out[count] = dict(devices=len(sharded["volumes"][1].sharding.device_set), param_devices=len(leaf.sharding.device_set),
                    loss=float(metrics["loss"]), params=[np.asarray(p).ravel().tolist() for p in jax.tree.leaves(state.params)])
out["mesh_sizes"] = [parallel.data_mesh(batch_size=b).devices.size for b in (4, 6, 5, 8)]
json.dump(out, sys.stdout)
"""


@pytest.mark.slow
def test_the_data_parallel_step_equals_the_single_device_step():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "JAX_THREEFRY_PARTITIONABLE": "1"}  # JAX's default: the same random bits however a batch is sharded
  result = subprocess.run([sys.executable, "-c", _SHARDED], cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout)
  assert out["1"]["devices"] == 1 and out["4"]["devices"] == 4 and out["4"]["param_devices"] == 4
  assert out["mesh_sizes"] == [4, 3, 1, 4]  # the most devices that split the batch evenly
  assert out["1"]["loss"] == pytest.approx(out["4"]["loss"], rel=1e-5)
  helpers.assert_f32_equal(out["4"]["params"], out["1"]["params"])  # to the scale of all the parameters
