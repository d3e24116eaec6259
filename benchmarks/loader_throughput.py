"""Input-pipeline speed: pyramid cache miss vs hit, and augmented volumes per second from the Loader.

    python benchmarks/loader_throughput.py [--sizes demo,paper] [--batches 6]

Uses the AFIDs T1w template (../shared or the wheel) as the image. "demo" = 3 levels 8/4/2 mm over
256 mm (128^3 finest); "paper" = 4 levels 4/2/1/0.5 mm, 448^3 finest. The loader runs with default
augmentation, inline (0 workers) and with 1 and 2 background processes, and without augmentation (what it
still does when `train.augment_on` is "device": read the cache, collate); the rate counts every volume
of the second epoch (the first one starts the worker processes). Last row per size: the on-device
augmentation (`augment_device.augment_batch`, jitted, batch of 1) on JAX's default device, as volumes/s.
Workers read the cache themselves and hand the volumes back through shared memory.
"""

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax
from timing import timed

from locnet_jax import dataset
from locnet_jax.data import afids, augment_device, augment_host, loader

SIZES = {"demo": dict(spacings_mm=(8.0, 4.0, 2.0), finest_size=128),
         "paper": dict(spacings_mm=(4.0, 2.0, 1.0, 0.5), finest_size=448)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="demo,paper")
  parser.add_argument("--batches", type=int, default=4, help="volumes per epoch")
  args = parser.parse_args()
  files = afids.read_source_files(roles=("T1w",))
  with tempfile.TemporaryDirectory() as tmp:
    image = Path(tmp) / "t1w.nii.gz"
    image.write_bytes(files["T1w"])
    print("| size | cache miss s | cache hit s | augmentation | loader workers | volumes/s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
      settings = loader.PreprocessSettings(**SIZES[size], intensity="mr")
      cache = Path(tmp) / f"cache-{size}"
      t0 = time.perf_counter()
      pyramid = loader.load_pyramid(image, settings, cache)
      miss = time.perf_counter() - t0
      t0 = time.perf_counter()
      pyramid = loader.load_pyramid(image, settings, cache)
      hit = time.perf_counter() - t0
      del pyramid
      case = dataset.Case("t1w", image, None, "train")
      sources = [loader.CachedCase(case, ("AC", "PC"), settings, cache)] * args.batches
      for where, workers in [("host", 0), ("host", 1), ("host", 2), ("none (device mode)", 0),
                             ("none (device mode)", 1)]:
        settings_or_none = augment_host.AugmentSettings() if where == "host" else None
        with loader.Loader(sources, batch_size=1, seed=0, augment=settings_or_none,
                             workers=workers, prefetch=2) as batches:
          for _ in batches.epoch(0):  # warm-up epoch: starts the worker processes
            pass
          t0 = time.perf_counter()
          count = sum(1 for _ in batches.epoch(1))
          rate = count / (time.perf_counter() - t0)
        print(f"| {size} | {miss:.2f} | {hit:.2f} | {where} | {workers} | {rate:.2f} |", flush=True)
      batch = jax.device_put(loader.collate([sources[0]()]))
      fn = jax.jit(functools.partial(augment_device.augment_batch, settings=augment_host.AugmentSettings()))
      median, _, _ = timed(lambda: jax.block_until_ready(fn(batch, jax.random.key(0))), 1, 3)
      print(f"| {size} | {miss:.2f} | {hit:.2f} | device ({jax.devices()[0].device_kind}; median of 3) | - | "
            f"{1 / median:.2f} |", flush=True)

if __name__ == "__main__":
  main()
