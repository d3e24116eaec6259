"""Builders and checks shared by the tests: affines, blob images, tiny configs and data sets, identity
parameters, and the float32 tolerance every equivalence check uses. Fixtures built from these live in
conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial.transform import Rotation

from configs import multiscale
from locnet_jax import geometry, io

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- float32 tolerance

F32_EPS = float(np.finfo(np.float32).eps)
F32_ULPS = 64  # summation-order slack: the same float32 function computed in another order (see f32_atol)


def f32_atol(reference, *, ulps: float = F32_ULPS) -> float:
  """The absolute tolerance for two float32 computations of the same quantity that differ only in the
  order of their sums (another CPU's vector width, patch groups, chunks, vmap against a loop).

  Rounding in a float32 sum scales with the largest terms summed, not with each result's own size: a
  small entry of a gradient whose entries reach 30 can move by 1e-5 when the summation order changes
  (AVX2 against AVX-512), far beyond its own relative epsilon, and a gradient that is zero in exact
  arithmetic (a bias before a normalisation) is rounding noise of the size of the others. So the
  tolerance is `ulps` float32 epsilons of the largest magnitude anywhere in `reference` (an array or a
  pytree: a whole gradient). A real fault (a wrong patch, a lost term) moves values by a sizeable
  fraction of that magnitude, thousands of times more.
  """
  leaves = [np.abs(np.asarray(x, np.float64)) for x in jax.tree.leaves(reference)]
  scale = max((float(x.max()) for x in leaves if x.size), default=0.0)
  return ulps * F32_EPS * max(scale, np.finfo(np.float32).tiny)


def assert_f32_equal(actual, expected, *, ulps: float = F32_ULPS, scale=None, err_msg: str = "") -> None:
  """`actual` equals `expected` (arrays or pytrees of float32 results, compared leaf by leaf) up to
  `f32_atol` of the whole of `expected`, or of `scale` when the result derives from larger values (a
  spread of coordinates: the coordinates)."""
  atol = f32_atol(expected if scale is None else scale, ulps=ulps)

  def check(a, e):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=0, atol=atol,
                               err_msg=err_msg)
  jax.tree.map(check, actual, expected)


# ---------------------------------------------------------------- frames and images

def affine(spacing, origin, rotation=np.eye(3), flip=(1, 1, 1)) -> np.ndarray:
  """Voxel -> RAS mm: rotation @ diag(spacing * flip), then origin."""
  out = np.eye(4)
  out[:3, :3] = rotation @ np.diag(np.asarray(spacing, float) * np.asarray(flip))
  out[:3, 3] = origin
  return out


def oblique_affine(angles_deg=(25, -10, 40), spacing=(-1.2, 0.9, 2.0), origin=(10.0, -20.0, 5.0),
                   order: str = "zyx") -> np.ndarray:
  """A rotated, (by default x-)flipped, anisotropic voxel -> RAS mm affine."""
  rotation = Rotation.from_euler(order, angles_deg, degrees=True).as_matrix()
  return affine(np.abs(spacing), origin, rotation, np.sign(spacing))


def voxel_grid_mm(affine_: np.ndarray, shape) -> np.ndarray:
  """(X, Y, Z, 3) world mm of every voxel centre."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
  return geometry.vox_to_mm(grid, affine_)


def blob_volume(affine_: np.ndarray, shape, centers_mm, amplitudes, sigma_mm: float) -> np.ndarray:
  """Gaussian blobs placed in world mm, sampled on the voxel grid of `affine_` (float32)."""
  grid_mm = voxel_grid_mm(affine_, shape)
  volume = np.zeros(shape)
  for c, a in zip(centers_mm, amplitudes):
    volume += a * np.exp(-np.sum((grid_mm - np.asarray(c)) ** 2, axis=-1) / (2 * sigma_mm ** 2))
  return volume.astype(np.float32)


def com_mm(volume: np.ndarray, affine_: np.ndarray) -> np.ndarray:
  """World centre of mass of the part of `volume` above its median (squared): where a blob is."""
  w = np.clip(volume - np.median(volume), 0, None) ** 2
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), -1)
  return geometry.vox_to_mm((grid * w[..., None]).sum((0, 1, 2)) / w.sum(), affine_)


PYRAMID_HALF_WIDTH_MM = 16.0  # `random_pyramid`'s grids reach this far from the world origin


def random_pyramid(batch=1, sizes=(8, 16, 32), spacings=(4.0, 2.0, 1.0), seed=0, flip=(1, 1, 1)):
  """Random volumes of a world-aligned pyramid covering (-16, 16) mm on every axis, with their affines.

  A prediction on it is a centre of mass over voxel coordinates reaching PYRAMID_HALF_WIDTH_MM, so its
  float32 rounding scales with that width, not with the (often small) result: compare predictions with
  ``assert_f32_equal(..., scale=PYRAMID_HALF_WIDTH_MM)``."""
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  volumes = [jax.random.normal(k, (batch, n, n, n)) for k, n in zip(keys, sizes)]
  flip = np.asarray(flip, float)
  affines = [jnp.asarray(affine([s] * 3, flip * (-16 + s / 2)), jnp.float32) @ jnp.diag(jnp.array([*flip, 1.0]))
             for s in spacings]
  return volumes, affines


# ---------------------------------------------------------------- models

def init(module, key, *args):
  """`module.init(key, *args)` compiled as one program: a Flax init runs the whole forward pass, which op by
  op (eager) compiles every primitive apart, several times slower on a CPU than one jit (same values up to
  rounding)."""
  return jax.jit(module.init)(key, *args)


def identity_scale_params() -> dict:
  """A depth-0 U-Net whose heatmap channel 0 is ReLU(image) and channel 1 ReLU(-image): the centre of
  mass of a bright blob (channel 0) or a dark one (channel 1) is its centre."""
  conv0 = np.zeros((3, 3, 3, 1, 2), np.float32)
  conv0[1, 1, 1, 0] = [1.0, -1.0]
  conv1 = np.zeros((3, 3, 3, 2, 2), np.float32)
  conv1[1, 1, 1] = np.eye(2)
  head = np.eye(2, dtype=np.float32).reshape(1, 1, 1, 2, 2)
  return {"unet": {"bottom_conv0": {"kernel": conv0, "bias": np.zeros(2, np.float32)},
                   "bottom_conv1": {"kernel": conv1, "bias": np.zeros(2, np.float32)},
                   "head": {"kernel": head, "bias": np.zeros(2, np.float32)}}}


def identity_locnet_params(num_scales: int) -> dict:
  """`identity_scale_params` for every scale of a MultiScaleLocNet (2 landmarks, unet depth 0, base 2)."""
  return jax.tree.map(jnp.asarray, {f"scale{s}": identity_scale_params() for s in range(num_scales)})


def checked_identity_params(params: dict, num_scales: int) -> dict:
  """`{"params": identity_locnet_params(num_scales)}`, checked to have the structure of `params` (a model's init)."""
  new = {"params": identity_locnet_params(num_scales)}
  assert jax.tree.structure(new) == jax.tree.structure(params)
  return new


# ---------------------------------------------------------------- configs and data sets

# patch_groups=1: one U-Net call per scale compiles several times faster than auto's one per patch (the
# same function: tests/model/test_locnet.py checks it)
TINY = {"data.spacings_mm": (8.0, 4.0), "data.finest_size": 16, "data.num_train": 2, "data.num_val": 1,
        "model.patch_size": 8, "model.unet.depth": 1, "model.unet.base_channels": 2, "model.patch_groups": 1}


def tiny_config(variant: str = "synthetic_demo", **changes):
  """configs/multiscale.py's `variant` made tiny (TINY, 3 epochs), then `changes` ("a.b": value)."""
  config = multiscale.get_config(variant)
  for key, value in {**TINY, "train.num_epochs": 3, **changes}.items():
    *path, name = key.split(".")
    target = config
    for part in path:
      target = target[part]
    target[name] = value
  return config


def tiny_cli_overrides(num_epochs: int) -> list[str]:
  """`tiny_config()` as train.py flags."""
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  return ["--config=configs/multiscale.py:synthetic_demo", *flags, f"--config.train.num_epochs={num_epochs}"]


def tiny_dataset(root: Path, count: int = 4, splits=None) -> Path:
  """A real data set on disk: blob images (NIfTI, 2 mm, LPS-stored) with Slicer landmarks "A", "B".
  `splits`: one per case (default: the last case "val", the others "train")."""
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  affine_ = np.diag([-2.0, -2.0, 2.0, 1.0])
  affine_[:3, 3] = [31.0, 31.0, -31.0]
  grid_mm = voxel_grid_mm(affine_, (32, 32, 32))
  splits = splits or ["train"] * (count - 1) + ["val"]
  cases = []
  for i in range(count):
    points = rng.uniform(-12, 12, (2, 3))
    image = sum((k + 1) * np.exp(-np.sum((grid_mm - p) ** 2, -1) / 50) for k, p in enumerate(points))
    image = image + 0.05 * rng.standard_normal(image.shape)
    io.save_volume(root / f"c{i}.nii.gz", image.astype(np.float32), affine_)
    io.write_mrk_json(root / f"c{i}.mrk.json", ["A", "B"], points, coordinate_system="LPS")
    cases.append({"id": f"c{i}", "image": f"c{i}.nii.gz", "landmarks": f"c{i}.mrk.json", "split": splits[i]})
  (root / "dataset.json").write_text(json.dumps({"name": "tiny", "landmarks": ["A", "B"], "cases": cases}))
  return root / "dataset.json"


def tiny_file_config(manifest: Path, cache: Path):
  """A tiny config training on the data set at `manifest` (2 epochs, one loader worker)."""
  config = multiscale.get_config("synthetic_demo")
  config.data.source, config.data.manifest, config.data.cache_dir = "manifest", str(manifest), str(cache)
  config.data.spacings_mm, config.data.finest_size = (8.0, 4.0), 16
  config.model.patch_size, config.model.unet.depth, config.model.unet.base_channels = 8, 1, 2
  config.model.patch_groups = 1
  config.train.num_epochs, config.train.loader_workers = 2, 1
  return config


def blob_pyramid(center_mm, *, affine_: np.ndarray, shape=(40, 40, 40), spacings_mm=(4.0, 2.0),
                 finest_size: int = 32, sigma_mm: float = 4.0):
  """The pyramid (`preprocess.build_pyramid`) of one Gaussian blob at `center_mm` on the grid of `affine_`."""
  from locnet_jax.data import preprocess
  data = blob_volume(affine_, shape, [center_mm], [1.0], sigma_mm)
  return preprocess.build_pyramid(data, affine_, spacings_mm=spacings_mm, finest_size=finest_size)


# ---------------------------------------------------------------- training runs

def restore_run(workdir: Path, config, *, best: bool = False):
  """A run's latest (or best) checkpoint (`checkpoints.Restored`), restored into a freshly built state."""
  from locnet_jax import from_config
  from locnet_jax.data import loader
  from locnet_jax.train import checkpoints, steps
  data = from_config.load_data(config.data, seed=config.seed, log=lambda *_: None)
  model = from_config.create_model(config.model, num_landmarks=len(data.names), num_scales=len(config.data.spacings_mm))
  example = loader.collate(data.val[:1])
  state = steps.create_train_state(model, key=jax.random.key(99), volumes=example["volumes"],
                                   affines=example["affines"], learning_rate=1.0)
  with checkpoints.Checkpoints(Path(workdir) / "checkpoints") as ckpts:
    return ckpts.restore_best(state) if best else ckpts.restore_latest(state)


def assert_trees_equal(a, b) -> None:
  """Bit-for-bit equal pytrees; for train states: step, parameters and optimiser moments."""
  from locnet_jax.train import steps
  if isinstance(a, steps.TrainState):
    a, b = (a.step, a.params, a.opt_state), (b.step, b.params, b.opt_state)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def metrics_records(workdir: Path) -> list[dict]:
  """A run's metrics.jsonl records without their wall times (which never repeat)."""
  from locnet_jax.train import reporting
  return [{k: v for k, v in r.items() if k != "epoch_s"} for r in reporting.read_metrics(Path(workdir) / "metrics.jsonl")]
