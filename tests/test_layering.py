"""The package's shape: data flows one way through the stage folders, every module is short and documented."""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "locnet_jax"
# Stages, lowest first: a module may import modules of lower stages and the modules listed before it in
# its own stage. A new module must be placed here before another can import it.
STAGES = {
    "base": ["xla_env", "cli", "parallel", "geometry", "io", "outputs", "dataset"],
    "data": ["data.preprocess", "data.variation", "data.augment_host", "data.variation_device", "data.augment_device",
             "data.loader", "data.resident", "data.synthetic", "data.afids", "data.afids_stress"],
    "model": ["model.ops", "model.unet", "model.presence", "model.locnet", "model.losses", "model.inference"],
    "config": ["from_config"],
    "train": ["train.steps", "train.checkpoints", "train.reporting", "train.loop"],
    "eval": ["eval.metrics", "eval.qc", "eval.figures", "eval.restore", "eval.cohort", "eval.predict", "eval.scoring",
             "eval.evaluate"],
}
# which stages a stage may import: `data` and `model` are independent of each other
MAY_IMPORT = {"base": set(), "data": {"base"}, "model": {"base"}, "config": {"base", "data", "model"},
              "train": {"base", "data", "model", "config"}, "eval": {"base", "data", "model", "config", "train"}}
ORDER = [m for modules in STAGES.values() for m in modules]
STAGE_OF = {m: stage for stage, modules in STAGES.items() for m in modules}
MAX_LINES = 400


def _local_imports(path: pathlib.Path) -> set[str]:
  """The locnet_jax modules a file imports, as dotted names below the package ("data.loader", "io")."""
  imported = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("locnet_jax"):
      below = node.module.split(".", 1)[1] if "." in node.module else ""
      for alias in node.names:
        candidate = f"{below}.{alias.name}" if below else alias.name
        imported.add(candidate if (PACKAGE / f"{candidate.replace('.', '/')}.py").is_file() else below)
    elif isinstance(node, ast.Import):
      imported |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("locnet_jax.")}
  return imported - {""}


def _module_files() -> dict[str, pathlib.Path]:
  return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
          for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_every_module_has_a_place():
  assert set(_module_files()) == set(ORDER), f"place new modules in STAGES: {sorted(set(_module_files()) ^ set(ORDER))}"


@pytest.mark.parametrize("module", ORDER)
def test_module_imports_only_what_is_below_it(module):
  path = _module_files()[module]
  stage = STAGE_OF[module]
  for imported in _local_imports(path) - {module}:
    assert imported in STAGE_OF, f"{path} imports unknown locnet_jax.{imported}"
    other = STAGE_OF[imported]
    if other == stage:
      assert ORDER.index(imported) < ORDER.index(module), f"{path} imports locnet_jax.{imported}, listed after it"
    else:
      assert other in MAY_IMPORT[stage], f"{path} ({stage}) imports locnet_jax.{imported} ({other}): upward"


def test_the_check_sees_imports():
  files = _module_files()
  assert _local_imports(files["model.locnet"]) >= {"geometry", "model.ops", "model.unet"}
  assert _local_imports(files["train.loop"]) >= {"from_config", "data.loader", "train.steps", "train.checkpoints"}


def test_every_stage_says_what_it_is_in_one_line():
  for init in [PACKAGE / "__init__.py", *PACKAGE.glob("*/__init__.py")]:
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc, f"{init} has no docstring"
    if init.parent != PACKAGE:
      assert "\n" not in doc and doc.lower().startswith("stage"), f"{init}: one line naming its stage"


@pytest.mark.parametrize("module", ORDER)
def test_module_is_short_documented_and_states_no_timings(module):
  path = _module_files()[module]
  text = path.read_text()
  assert len(text.splitlines()) <= MAX_LINES, f"{path}: split it (over {MAX_LINES} lines)"
  tree = ast.parse(text)
  assert ast.get_docstring(tree), f"{path} has no module docstring"
  docs = [ast.get_docstring(n) or "" for n in ast.walk(tree)
          if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
  comments = re.findall(r"#.*", text)
  for line in docs + comments:
    assert not re.search(r"\d\s*(ms|GFLOP|TFLOP|s/step)\b", line), \
        f"{path}: a measured timing belongs in docs/ or benchmarks/results/, not the code: {line!r}"
