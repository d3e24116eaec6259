"""Can the input keep up with the device? Training steps per second with each way of feeding them.

    python benchmarks/device_input.py --size demo      # this CPU
    python benchmarks/device_input.py --size paper     # a GPU (gpu_all.sh); on 2 CPU cores ~1 min a row

Random pyramids of --cases cases (the sizes of model_cost.py), batch 1, noise on. Rows, each the median
of --repeats steps after --warmup, ended with block_until_ready:
  step only            the jitted training step on a batch already on the device (the ceiling);
  resident + device    `resident.ResidentData` gather + `augment_device.augment_batch` + step: what
                       `train.data_on="device", augment_on="device"` runs (no host work per step);
  host batch + device  a collated NumPy batch copied to the device each step + device augmentation +
                       step (`augment_on="device"` with the host loader; its reading and collating,
                       measured by loader_throughput.py, comes on top);
  device augment only  `augment_batch` alone, and the resident gather alone.
"""

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from locnet_jax import xla_env

xla_env.prefer_channels_last_convolutions()  # as train.py and evaluate.py do: GPU convolutions in NDHWC
import jax
import model_cost
from timing import timed

from locnet_jax import parallel
from locnet_jax.data import augment_device, augment_host, loader, preprocess, resident
from locnet_jax.model import losses
from locnet_jax.model.locnet import MultiScaleLocNet
from locnet_jax.train import steps


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=("demo", "paper", "paper6"), default="demo")
  parser.add_argument("--cases", type=int, default=4)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  spec = model_cost.SIZES[args.size]
  volumes, affines, target = model_cost._inputs(spec)
  rng = np.random.default_rng(0)
  examples = [loader.Example(f"c{i}", preprocess.Pyramid(
      tuple(rng.uniform(0, 1, v.shape[1:]).astype(np.float16).astype(np.float32) for v in volumes),
      tuple(np.asarray(a[0]) for a in affines)), np.asarray(target[0])) for i in range(args.cases)]
  model = MultiScaleLocNet(spec["num_landmarks"], num_scales=len(spec["spacings"]), patch_shape=(spec["patch"],) * 3,
                           unet={**spec["unet"], "norm": "instance"})
  state = steps.create_train_state(model, key=jax.random.key(0), volumes=volumes, affines=affines,
                                      learning_rate=5e-4)
  weights = losses.loss_weights(250, num_epochs=500, num_scales=len(spec["spacings"]))
  step = jax.jit(lambda s, b, k: steps.train_step(s, b, k, weights=weights))
  aug = jax.jit(functools.partial(augment_device.augment_batch, settings=augment_host.AugmentSettings()))
  mesh = parallel.data_mesh(batch_size=1)
  data = resident.ResidentData(examples, batch_size=1, seed=0, mesh=mesh)
  host_batch = loader.collate(examples[:1])
  device_batch = parallel.shard_batch(host_batch, mesh)
  key = jax.random.key(1)
  holder = {"state": state, "i": 0}

  def run(make_batch, train=True):
    def once():
      holder["i"] += 1
      batch = make_batch(holder["i"])
      if train:
        holder["state"], metrics = step(holder["state"], batch, key)
        jax.block_until_ready(metrics)
      else:
        jax.block_until_ready(batch)
    return once

  def resident_batch(i):
    return next(data.epoch(i))

  rows = [("step only", run(lambda i: device_batch)),
          ("resident + device augmentation + step", run(lambda i: aug(resident_batch(i), jax.random.key(i)))),
          ("host batch copied + device augmentation + step",
           run(lambda i: aug(parallel.shard_batch(host_batch, mesh), jax.random.key(i)))),
          ("device augmentation only", run(lambda i: aug(device_batch, jax.random.key(i)), train=False)),
          ("resident gather only", run(resident_batch, train=False))]
  print(f"size={args.size}  device={jax.devices()[0].device_kind}  jax={jax.__version__}  {args.cases} cases on the "
        f"device: {data.nbytes / 1e9:.2f} GB; median of {args.repeats} after {args.warmup}")
  print("| what | median ms (min-max) | per second |")
  print("|---|---|---|")
  for name, fn in rows:
    median, low, high = timed(fn, args.warmup, args.repeats)
    print(f"| {name} | {1e3 * median:.1f} ({1e3 * low:.1f}-{1e3 * high:.1f}) | {1 / median:.2f} |", flush=True)


if __name__ == "__main__":
  main()
