"""The benchmarks' timer: median, min and max wall time of `fn()` after warm-up calls."""

import statistics
import time


def timed(fn, warmup: int, repeats: int) -> tuple[float, float, float]:
  """(median, min, max) seconds of `repeats` calls of `fn` after `warmup` untimed ones; `fn` must block
  until its result is ready (e.g. end with `jax.block_until_ready`)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), max(times)
