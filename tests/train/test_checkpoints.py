"""Checkpoints on disk: the best one survives the writing of the next, and a workdir has one trainer at a time."""

import os

import jax
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


def _init_params(model, seed: int, sizes=(4, 8)):
  from tests import helpers
  volumes, affines = helpers.random_pyramid(sizes=sizes, spacings=(8.0, 4.0, 2.0)[:len(sizes)])
  return helpers.init(model, jax.random.key(seed), volumes, affines)["params"]


def test_warm_start_takes_every_leaf_the_source_has_and_keeps_the_new_ones(tmp_path):
  from locnet_jax.model import locnet
  unet = {"depth": 1, "base_channels": 2}
  plain = locnet.MultiScaleLocNet(2, num_scales=2, unet=unet, patch_shape=(4, 4, 4))
  with_presence = locnet.MultiScaleLocNet(2, num_scales=2, unet=unet, patch_shape=(4, 4, 4), presence=True)
  source = _init_params(plain, seed=1)
  checkpoints.export_model(tmp_path / "m", source, {"landmarks": ["A", "B"]})
  fresh = _init_params(with_presence, seed=2)
  started, new = checkpoints.warm_start(fresh, tmp_path / "m", landmarks=("A", "B"))
  assert new == ["presence/bias", "presence/weight"]
  np.testing.assert_array_equal(started["presence"]["weight"], fresh["presence"]["weight"])
  for name in source:  # every scale's U-Net comes from the source, not from the fresh init
    jax.tree.map(np.testing.assert_array_equal, started[name], source[name])
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh["scale0"]), jax.tree.leaves(source["scale0"])))


def test_two_sources_fill_one_model_in_turn(tmp_path):
  """A localiser and a presence reader trained apart: the first gives every leaf it has, the second only what
  the first lacked (its own scale 0 is ignored), and a second source with nothing left to give is refused."""
  from locnet_jax.model import locnet
  unet = {"depth": 1, "base_channels": 2}
  two_scales = locnet.MultiScaleLocNet(2, num_scales=2, unet=unet, patch_shape=(4, 4, 4))
  reader = locnet.MultiScaleLocNet(2, num_scales=1, unet=unet, presence=True, presence_from="image")
  localiser, presence = _init_params(two_scales, seed=1), _init_params(reader, seed=3, sizes=(8,))
  checkpoints.export_model(tmp_path / "loc", localiser, {"landmarks": ["A", "B"]})
  checkpoints.export_model(tmp_path / "pres", presence, {"landmarks": ["A", "B"]})
  fresh = _init_params(two_scales.clone(presence=True, presence_from="image"), seed=2, sizes=(8, 16))
  started, new = checkpoints.warm_start(fresh, tmp_path / "loc", landmarks=("A", "B"))
  assert new and all(path.startswith("presence/") for path in new)
  started, new = checkpoints.warm_start(started, tmp_path / "pres", landmarks=("A", "B"), only=new)
  assert new == []
  for name in ("scale0", "scale1"):
    jax.tree.map(np.testing.assert_array_equal, started[name], localiser[name])
  jax.tree.map(np.testing.assert_array_equal, started["presence"], presence["presence"])
  with pytest.raises(io.DataError, match="that an earlier source did not give"):
    checkpoints.warm_start(started, tmp_path / "pres", landmarks=("A", "B"), only=[])
  from locnet_jax.train import loop
  assert loop.path_summary(["scale3/unet/head/bias", "presence/bias", "scale3/unet/enc0_conv0/kernel",
                            "presence/weight", "scale2/unet/head/bias"]) == "presence (2), scale2/unet (1), scale3/unet (2)"
  assert loop.comma_separated(f" {tmp_path / 'loc'}, {tmp_path / 'pres'} ,") == [str(tmp_path / "loc"),
                                                                             str(tmp_path / "pres")]


def test_a_wider_finest_scale_starts_afresh_under_the_warm_started_rest(tmp_path):
  """`finest_unet` widens only the last scale; `skip` keeps its init (a shape mismatch there is no error)
  while every other scale comes from the source, and a mismatch outside `skip` is still refused."""
  from locnet_jax.model import locnet
  unet = {"depth": 1, "base_channels": 2}
  plain = locnet.MultiScaleLocNet(2, num_scales=3, unet=unet, patch_shape=(4, 4, 4))
  wide = plain.clone(finest_unet={"base_channels": 6})
  source, fresh = _init_params(plain, seed=1, sizes=(8, 16, 32)), _init_params(wide, seed=2, sizes=(8, 16, 32))
  widths = lambda params: {leaf.shape[-1] for leaf in jax.tree.leaves(params)}  # noqa: E731
  assert max(widths(fresh["scale2"])) > max(widths(source["scale2"]))  # wider
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), fresh["scale1"], source["scale1"])
  checkpoints.export_model(tmp_path / "m", source, {"landmarks": ["A", "B"]})
  with pytest.raises(io.DataError, match="scale2/.* shape"):
    checkpoints.warm_start(fresh, tmp_path / "m", landmarks=("A", "B"))
  started, new = checkpoints.warm_start(fresh, tmp_path / "m", landmarks=("A", "B"), skip=("scale2/",))
  assert new and all(path.startswith("scale2/") for path in new)
  jax.tree.map(np.testing.assert_array_equal, started["scale2"], fresh["scale2"])
  for name in ("scale0", "scale1"):
    jax.tree.map(np.testing.assert_array_equal, started[name], source[name])
  with pytest.raises(io.DataError, match="scale2/.* shape"):  # "scale" is no path prefix of "scale2/..."
    checkpoints.warm_start(fresh, tmp_path / "m", landmarks=("A", "B"), skip=("scale",))


def test_warm_start_refuses_what_does_not_fit(tmp_path):
  from locnet_jax.model import locnet
  small = locnet.MultiScaleLocNet(2, num_scales=2, unet={"depth": 1, "base_channels": 2}, patch_shape=(4, 4, 4))
  wide = locnet.MultiScaleLocNet(2, num_scales=2, unet={"depth": 1, "base_channels": 4}, patch_shape=(4, 4, 4))
  checkpoints.export_model(tmp_path / "m", _init_params(small, seed=1), {"landmarks": ["A", "B"]})
  target = _init_params(small, seed=2)
  with pytest.raises(io.DataError, match="landmarks"):
    checkpoints.warm_start(target, tmp_path / "m", landmarks=("B", "A"))
  with pytest.raises(io.DataError, match="shape"):
    checkpoints.warm_start(_init_params(wide, seed=2), tmp_path / "m", landmarks=("A", "B"))
  with pytest.raises(io.DataError, match="not an exported model folder"):
    checkpoints.warm_start(target, tmp_path / "nothing", landmarks=("A", "B"))
