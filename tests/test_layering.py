"""Data flows one way: a library module imports only modules below it in LAYERS."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "locnet_jax"
# lowest first; a new module must be placed here before it can be imported by another
LAYERS = ["xla_env", "geometry", "io", "preprocess", "augment", "pipeline", "synthetic", "datasets", "ops", "device_augment", "unet", "models",
          "inference", "losses", "metrics", "training", "parallel", "resident", "checkpoints", "reporting", "train_lib",
          "figures", "evaluation"]


def _local_imports(path):
  imported = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("locnet_jax"):
      parts = node.module.split(".")
      imported |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
    elif isinstance(node, ast.Import):
      imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("locnet_jax.")}
  return imported


def _files(module):
  """The source files of a module, or of every module of a subpackage."""
  package = PACKAGE / module
  return sorted(package.glob("*.py")) if package.is_dir() else [PACKAGE / f"{module}.py"]


def test_every_module_is_layered():
  modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
  modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
  assert modules == set(LAYERS), f"place new modules in LAYERS: {sorted(modules ^ set(LAYERS))}"


@pytest.mark.parametrize("module", LAYERS)
def test_module_imports_only_lower_layers(module):
  rank = LAYERS.index(module)
  for path in _files(module):
    for imported in _local_imports(path) - {module}:
      assert imported in LAYERS[:rank], f"{path.name} of locnet_jax.{module} imports locnet_jax.{imported}"


def test_the_check_sees_imports():
  assert _local_imports(PACKAGE / "models.py") >= {"geometry", "ops", "unet"}
