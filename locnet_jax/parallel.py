"""Parallelism: the batch split over a 1-D ``data`` mesh axis, parameters replicated (jax.sharding); and
how many processes host-side work (preprocessing, data set building) may use (`cpu_workers`), in pools
whose workers die with their parent (`process_pool`).

Every process (host) iterates the same global batches; each puts its own slice on its local devices
(`jax.make_array_from_process_local_data`), so one process or many run the same computation. The jitted
step needs no change: XLA inserts the gradient all-reduce from the shardings.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import multiprocessing
import os
import platform
import signal
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
MAX_CPU_WORKERS = 8  # beyond this, preprocessing and building are bound by disk and memory, not cores


def die_with_parent(parent_pid: int) -> None:
  """In a worker process: be killed when `parent_pid` dies (Linux `PR_SET_PDEATHSIG`), and exit at once if
  it already has, so no worker outlives a killed run (each can hold hundreds of MB)."""
  if sys.platform.startswith("linux"):
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  if os.getppid() != parent_pid:
    os._exit(1)


def process_pool(workers: int, *, initializer=None, initargs=()) -> concurrent.futures.ProcessPoolExecutor:
  """`workers` spawned processes (no fork of a process that may hold JAX's threads) that die with this one;
  `initializer(*initargs)` then runs in each."""
  return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(os.getpid(), initializer, initargs))


def _init_worker(parent_pid: int, initializer, initargs) -> None:
  die_with_parent(parent_pid)
  if initializer is not None:
    initializer(*initargs)


def host_description() -> str:
  """The machine a run used, for its records: "<CPU model>, <n> cores, <JAX device kind> x<count>"."""
  cpu = platform.processor() or "unknown CPU"
  if os.path.isfile("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  devices = jax.local_devices()
  return f"{cpu}, {os.cpu_count()} cores, {devices[0].device_kind} x{len(devices)}"


def cpu_workers() -> int:
  """Processes for host work (preprocessing, data set building): one per core, at most `MAX_CPU_WORKERS`."""
  return min(os.cpu_count() or 1, MAX_CPU_WORKERS)


def data_mesh(*, batch_size: int, devices=None) -> Mesh:
  """A ``data`` mesh over the most devices that split `batch_size` evenly (all of them when it divides).

  With several processes every device must take part, so `batch_size` must be a multiple of
  `jax.device_count()`.
  """
  devices = list(jax.devices() if devices is None else devices)
  if jax.process_count() > 1 and batch_size % len(devices):
    raise ValueError(f"train.batch_size={batch_size} must be a multiple of the {len(devices)} devices of "
                     f"the {jax.process_count()} processes")
  count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
  return Mesh(np.asarray(devices[:count]), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf of `tree` (parameters, optimiser state) on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Splits every leaf's leading (batch) axis over the mesh; each process passes the same global batch."""
  sharding = batch_sharded(mesh)
  count, index = jax.process_count(), jax.process_index()

  def put(x):
    x = np.asarray(x)
    local = x.reshape(count, -1, *x.shape[1:])[index] if count > 1 else x
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return jax.tree.map(put, batch)
