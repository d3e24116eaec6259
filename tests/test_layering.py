"""Data flows one way: a library module imports only modules below it in LAYERS."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "locnet_jax"
# lowest first; a new module must be placed here before it can be imported by another
LAYERS = ["geometry", "io", "preprocess", "synthetic", "ops", "unet", "models", "losses", "training", "train_lib"]


def _local_imports(path):
  imported = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("locnet_jax"):
      parts = node.module.split(".")
      imported |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
    elif isinstance(node, ast.Import):
      imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("locnet_jax.")}
  return imported


def test_every_module_is_layered():
  modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
  assert modules == set(LAYERS), f"place new modules in LAYERS: {sorted(modules ^ set(LAYERS))}"


@pytest.mark.parametrize("module", LAYERS)
def test_module_imports_only_lower_layers(module):
  rank = LAYERS.index(module)
  for imported in _local_imports(PACKAGE / f"{module}.py"):
    assert imported in LAYERS[:rank], f"locnet_jax.{module} imports locnet_jax.{imported}, not below it"


def test_the_check_sees_imports():
  assert _local_imports(PACKAGE / "models.py") >= {"geometry", "ops", "unet"}
