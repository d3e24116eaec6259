"""The installable package: the wheel built from this checkout holds every module of `locnet_jax` and its
shipped resources, declares requirements.txt's runtime ranges, and, installed into a fresh virtual
environment, imports and predicts from outside the repository exactly as the repository's code does.

The wheel is built from a copy of the checkout's files (tracked and untracked-but-not-ignored), because
setuptools leaves `build/` and `locnet_jax.egg-info/` in the folder it builds in; with the installed
setuptools when it can build wheels by itself (>= 70.1, or with the `wheel` package), offline, else in
pip's isolated build environment (which fetches setuptools from the package index). The fresh environment
gets the running interpreter's site-packages (jax, flax, ...) through a `.pth` file, so installing
downloads nothing; `--system-site-packages` alone would give only the base interpreter's packages when
the tests run inside a virtual environment. The repository is never on its `sys.path`.
"""

import csv
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from packaging.requirements import Requirement

import locnet_jax
from locnet_jax import from_config, io
from locnet_jax.data import loader
from locnet_jax.eval import predict
from locnet_jax.train import checkpoints
from tests import helpers

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "locnet_jax"
RESOURCES = PACKAGE / "data" / "resources"
TEST_ONLY = {"pytest", "pytest-xdist", "setuptools"}  # requirements.txt lines the package does not need at run time
LANDMARKS = ("A", "B")
BLOBS_MM = np.array([[9.0, -6.0, 4.0], [-7.0, 8.0, -5.0]])  # a bright and a dark blob, RAS mm


def _run(args, *, cwd, timeout=300, check=True) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
  done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)
  if check and done.returncode != 0:
    pytest.fail(f"{' '.join(map(str, args))} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
  return done


def _checkout_files() -> list[str]:
  """The working tree's files as git sees them (tracked, and untracked but not ignored)."""
  try:
    done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
  except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout: the files a build reads
    return [str(p.relative_to(ROOT)) for p in ROOT.iterdir() if p.is_file()] + [
        str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
  else:
    return [name for name in done.stdout.split("\0") if name and (ROOT / name).is_file()]


def _build_wheel(source: Path, dist: Path) -> Path:
  """`pip wheel` with the installed setuptools (offline); with an isolated build environment only when the
  installed setuptools cannot build wheels by itself (setuptools < 70.1 without the `wheel` package)."""
  base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, source]
  done = _run(base[:4] + ["--no-build-isolation"] + base[4:], cwd=dist.parent, check=False)
  if done.returncode != 0:
    isolated = _run(base, cwd=dist.parent, check=False)
    if isolated.returncode != 0:
      pytest.fail(f"pip wheel failed without build isolation:\n{done.stderr[-3000:]}\n"
                  f"and with it:\n{isolated.stdout[-2000:]}\n{isolated.stderr[-3000:]}")
  wheels = list(dist.glob("locnet_jax-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


def _fresh_venv(folder: Path) -> Path:
  """A new virtual environment that sees the running interpreter's site-packages (after its own)."""
  _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", folder], cwd=folder.parent)
  python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
  own = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder.parent)
  # every site-packages folder the running interpreter reads, those a .pth file added included (in order)
  parents = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")] + site.getsitepackages()
  (Path(own.stdout.strip()) / "_running_interpreter_site.pth").write_text(
      "".join(f"{p}\n" for p in dict.fromkeys(parents) if Path(p).is_dir()))
  return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(the wheel, the fresh environment's python with the wheel installed, a working folder outside the repo)."""
  tmp = tmp_path_factory.mktemp("package")
  source = tmp / "source"
  for name in _checkout_files():
    (source / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / name, source / name)
  (tmp / "dist").mkdir()
  wheel = _build_wheel(source, tmp / "dist")
  python = _fresh_venv(tmp / "venv")
  _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp)
  outside = tmp / "outside"
  outside.mkdir()
  return wheel, python, outside


def test_the_wheel_holds_every_module_and_the_resources_and_nothing_else(installed):
  wheel, _, _ = installed
  names = set(zipfile.ZipFile(wheel).namelist())
  modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
  assert {"locnet_jax/data/afids.py", "locnet_jax/model/locnet.py", "locnet_jax/train/loop.py",
          "locnet_jax/eval/predict.py"} <= modules  # the subpackages the old `packages = ["locnet_jax"]` missed
  assert modules - names == set()
  resources = {p.relative_to(ROOT).as_posix() for p in RESOURCES.rglob("*") if p.is_file()}
  assert len(resources) >= 6 and resources - names == set()  # consensus, 4 raters, NOTICE.md
  dist_info = f"locnet_jax-{locnet_jax.__version__}.dist-info/"
  assert {n for n in names if not n.startswith(dist_info)} == modules | resources  # no configs/, tests/, ...


def test_the_wheel_declares_the_runtime_requirements_of_requirements_txt(installed):
  wheel, _, _ = installed
  with zipfile.ZipFile(wheel) as z:
    metadata = z.read(f"locnet_jax-{locnet_jax.__version__}.dist-info/METADATA").decode()
  fields = [line.split(": ", 1) for line in metadata.splitlines() if ": " in line and not line.startswith(" ")]
  assert ["Version", locnet_jax.__version__] in fields and ["Requires-Python", ">=3.10"] in fields
  declared = {(r := Requirement(v)).name.lower().replace("_", "-"): r.specifier for k, v in fields if k == "Requires-Dist"}
  wanted = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line and (r := Requirement(line)).name.lower() not in TEST_ONLY:
      wanted[r.name.lower().replace("_", "-")] = r.specifier
  assert declared == wanted


def test_the_installed_copy_imports_every_module_from_outside_the_repository(installed):
  _, python, outside = installed
  venv = python.parent.parent
  code = f"""
import importlib, pkgutil, sys
from pathlib import Path
import locnet_jax
assert Path(locnet_jax.__file__).resolve().is_relative_to({str(venv.resolve())!r}), locnet_jax.__file__
assert not any(Path(p or ".").resolve() == Path({str(ROOT)!r}) for p in sys.path), sys.path
def fail(name):
  raise ImportError(name)
names = [m.name for m in pkgutil.walk_packages(locnet_jax.__path__, "locnet_jax.", onerror=fail)]
for name in names:
  importlib.import_module(name)
from locnet_jax.data import afids
raters = sorted(p.name for p in (afids.RESOURCES / "raters").glob("*.fcsv"))
assert afids.RESOURCES.is_relative_to(Path(locnet_jax.__file__).parent), afids.RESOURCES
assert len(raters) == 4 and (afids.RESOURCES / "NOTICE.md").is_file(), raters
for path in (afids.RESOURCES / "raters").glob("*.fcsv"):
  assert afids.parse_afids(path.read_bytes()).shape == (32, 3), path
print("\\n".join(names))
"""
  done = _run([python, "-c", code], cwd=outside)
  imported = set(done.stdout.split())
  expected = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
              for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
  assert imported == expected - {"locnet_jax"}


def _oblique_image(path: Path) -> Path:
  """An anisotropic, oblique, x-flipped NIfTI centred near the world origin: a bright and a dark blob."""
  shape = (30, 34, 26)
  affine = helpers.oblique_affine(angles_deg=(14, -9, 23), spacing=(-3.3, 2.8, 3.9), origin=(0.0, 0.0, 0.0))
  affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
  image = helpers.blob_volume(affine, shape, BLOBS_MM, (1.0, -1.0), sigma_mm=6.0)
  io.save_volume(path, image + 0.002 * helpers.voxel_grid_mm(affine, shape)[..., 0].astype(np.float32), affine)
  return path


def _tiny_exported_model(folder: Path, image: Path) -> Path:
  """An untrained tiny 2-scale model (helpers.tiny_config) exported as predict.py reads it. Its parameters
  are drawn with numpy into the shapes `jax.eval_shape` gives: no XLA work here (an eager or jitted
  `model.init` costs 10-30 s on 2 CPU cores, and each predict_images pays one in restore)."""
  config = helpers.tiny_config(**{"eval.num_noise_samples": 2, "model.patch_groups": 1,
                                  "model.unet.conv_impl": "xla"})  # speed only (same function): fewer ops
  model = from_config.create_model(config.model, num_landmarks=len(LANDMARKS), num_scales=len(config.data.spacings_mm))
  pyramid = loader.compute_pyramid(image, from_config.preprocess_settings(config.data))
  batch = loader.collate([loader.Example("x", pyramid, np.zeros((0, 3)))])
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch["volumes"], batch["affines"])["params"]
  rng = np.random.default_rng(3)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return np.full(leaf.shape, 0.05, leaf.dtype)
    return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(leaf.dtype)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  checkpoints.export_model(folder, params, {"landmarks": list(LANDMARKS), "config": from_config.config_dict(config)})
  return folder


def _read_csv(path: Path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_the_installed_copy_predicts_outside_the_repository_as_the_repository_does(installed):
  _, python, outside = installed
  image = _oblique_image(outside / "case7.nii.gz")
  model = _tiny_exported_model(outside / "model", image)
  code = (f"import json; from locnet_jax.eval import predict; "
          f"p = predict.predict_images({str(model)!r}, [{str(image)!r}], {str(outside / 'out')!r}, num_samples=2); "
          f"print(json.dumps({{'file': predict.__file__, 'mean_mm': p[0]['mean_mm'].tolist()}}))")
  done = _run([python, "-c", code], cwd=outside)
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert Path(result["file"]).resolve().is_relative_to(python.parent.parent.resolve())
  assert (outside / "out" / "case7.mrk.json").is_file() and (outside / "out" / "case7.csv").is_file()
  rows = _read_csv(outside / "out" / "predictions.csv")
  assert [(r["case_id"], r["label"]) for r in rows] == [("case7", name) for name in LANDMARKS]
  installed_mm = np.array([[float(r[c]) for c in "xyz"] for r in rows])
  assert np.all(np.isfinite(installed_mm)) and all(float(r["std_x"]) >= 0 for r in rows)

  mine = predict.predict_images(model, [image], outside / "out_repo", num_samples=2)  # this checkout's code
  assert Path(predict.__file__).resolve().is_relative_to(ROOT)
  repo_mm = np.array([[float(r[c]) for c in "xyz"] for r in _read_csv(outside / "out_repo" / "predictions.csv")])
  np.testing.assert_allclose(installed_mm, repo_mm, atol=1e-4)
  np.testing.assert_allclose(result["mean_mm"], mine[0]["mean_mm"], atol=1e-4)
  np.testing.assert_allclose(io.load_landmarks(outside / "out" / "case7.mrk.json", LANDMARKS), repo_mm, atol=1e-4)
