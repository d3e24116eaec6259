"""Checkpoints on disk: the best one survives the writing of the next, and a workdir has one trainer at a time."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from locnet_jax import io
from locnet_jax.train import checkpoints


def test_the_previous_best_stays_until_the_next_is_complete(tmp_path):
  state = {"w": jnp.arange(3.0)}
  with checkpoints.Checkpoints(tmp_path) as saved:
    for epoch in (1, 2, 3):
      saved.save(epoch, {"w": state["w"] * epoch}, {"epoch": epoch}, is_best=epoch != 2)
    assert saved.best_path() == tmp_path / "best" / "3"
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["1", "3"]  # the one before is kept
    np.testing.assert_array_equal(saved.restore_best(state).state["w"], np.arange(3.0) * 3)


def test_a_workdir_lock_names_its_holder_and_is_taken_over_when_the_holder_died(tmp_path):
  logged = []
  with checkpoints.WorkdirLock(tmp_path, log=logged.append):
    assert (tmp_path / ".lock").read_text().startswith(f"PID {os.getpid()} on ")
    with pytest.raises(io.DataError, match=rf"{tmp_path}: in use by another training run \(PID {os.getpid()} on "):
      checkpoints.WorkdirLock(tmp_path).__enter__()  # flock: a second open file conflicts, even in one process
  assert (tmp_path / ".lock").read_text() == "" and not logged
  (tmp_path / ".lock").write_text("PID 999999 on elsewhere since 2026-01-01 00:00:00\n")  # killed: no flock held
  with checkpoints.WorkdirLock(tmp_path, log=logged.append):
    pass
  assert logged == [f"{tmp_path}: taking over the lock of PID 999999 on elsewhere since 2026-01-01 00:00:00, "
                    "which is no longer running"]
