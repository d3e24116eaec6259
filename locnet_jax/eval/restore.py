"""A trained model back from disk: a run's best (or latest) checkpoint, or an exported model folder.

The model is rebuilt from the config (`from_config.create_model`) and the parameters restored into
its structure, so a checkpoint that does not fit the config is an error, not a silent mismatch.
`export` writes the small, self-contained folder `predict.py` reads (parameters + `model.json`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections

from locnet_jax import from_config, io
from locnet_jax.data import loader
from locnet_jax.eval import qc
from locnet_jax.train import checkpoints as checkpoints_lib
from locnet_jax.train import loop, steps


@dataclasses.dataclass
class Trained:
  """A restored model: the module, its parameters, the landmark names it predicts, its checkpoint."""

  model: Any
  params: Any
  names: tuple[str, ...]
  checkpoint: Path
  meta: dict


def saved_config(workdir: Path) -> ml_collections.ConfigDict:
  """The config a model was trained with: an exported folder's `model.json`, or a run's `config.json`."""
  workdir = Path(workdir)
  if checkpoints_lib.is_exported(workdir):
    return ml_collections.ConfigDict(json.loads((workdir / checkpoints_lib.EXPORT_META).read_text())["config"])
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise io.DataError(config_path, "no such file: is this a training workdir or an exported model?")
  return ml_collections.ConfigDict(json.loads(config_path.read_text()))


def restore(config: ml_collections.ConfigDict, workdir: Path, *, example: loader.Example,
            which: str = "best") -> Trained:
  """The run's best (or latest) checkpoint, or an exported model folder, with the model its config describes."""
  if checkpoints_lib.is_exported(workdir):
    card = json.loads((Path(workdir) / checkpoints_lib.EXPORT_META).read_text())
    names = tuple(card["landmarks"])
    model = from_config.create_model(config.model, num_landmarks=len(names), num_scales=len(config.data.spacings_mm))
    batch = loader.collate([example])
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch["volumes"], batch["affines"])  # no compute
    params, card = checkpoints_lib.load_exported(workdir, shapes["params"])
    return Trained(model, params, names, Path(workdir) / checkpoints_lib.EXPORT_PARAMS, card)
  with checkpoints_lib.Checkpoints(Path(workdir) / "checkpoints") as checkpoints:
    meta = checkpoints.read_meta(best=which == "best")
    if meta is None:
      raise io.DataError(workdir, f"no {which} checkpoint: train first (python train.py --workdir={workdir} ...)")
    names = tuple(meta.get("landmarks") or from_config.landmark_names(ml_collections.ConfigDict(meta["config"]["data"])))
    model = from_config.create_model(config.model, num_landmarks=len(names), num_scales=len(config.data.spacings_mm))
    batch = loader.collate([example])
    state = jax.eval_shape(lambda: steps.create_train_state(  # the structure only: nothing is computed
        model, key=jax.random.key(0), volumes=batch["volumes"], affines=batch["affines"],
        learning_rate=steps.learning_rate(config.train.learning_rate,
                                          schedule=config.train.get("lr_schedule", "constant"))))
    restored = checkpoints.restore_best(state) if which == "best" else checkpoints.restore_latest(state)
    path = checkpoints.best_path() if which == "best" else checkpoints.latest_path()
  return Trained(model, restored.state.params, names, path, meta)


def export(config: ml_collections.ConfigDict, workdir: Path, out: Path, *, example: loader.Example,
           notes: str = "", training_data: dict | None = None) -> dict:
  """Writes the run's parameters (the checkpoint `config.eval.checkpoint` names, as `evaluate` scores it:
  "best" or "latest") and a model card (config, landmarks, provenance, measured errors, and the QC
  thresholds and uncertainty calibration `evaluate` fitted, which `predict` applies).

  Provenance: `training_data` (what `from_config.data_recipe` says of the data set) and `runs`, one entry
  per training run the parameters went through: a run continued from exported models
  (`train.init_from`) lists theirs first, so `total_training_seconds` is the whole chain's. The cards of
  `train.init_from` are read before anything is written (a continued run may be exported over them)."""
  trained = restore(config, workdir, example=example, which=config.eval.get("checkpoint", "best"))
  records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  results_path = Path(workdir) / "eval" / "test" / "results.json"
  results = json.loads(results_path.read_text()) if results_path.is_file() else None
  init_from = config.train.get("init_from", "")
  run = {"workdir": str(workdir), "epochs": len(records),
         "training_seconds": round(sum(r["epoch_s"] for r in records), 1),
         "trained_on": sorted({r.get("host", "not recorded") for r in records}), "init_from": init_from or None}
  runs = earlier_runs(init_from) + [run]
  card = {"landmarks": list(trained.names), "config": json.loads(config.to_json_best_effort()),
          "checkpoint": io.portable_path(trained.checkpoint), "best_epoch": trained.meta.get("best_epoch"),
          "best_val_error_mm": trained.meta.get("best_val_error_mm"), "epochs": len(records),
          "training_seconds": run["training_seconds"], "trained_on": run["trained_on"],
          "runs": runs, "total_training_seconds": round(sum(r["training_seconds"] for r in runs), 1),
          "training_data": training_data, "exported_with_jax": jax.__version__,
          "test": None if results is None else {"data": io.portable_path(results["data"]), "split": results["split"],
                                                 "overall": results["overall"],
                                                 "uncertainty": results.get("uncertainty"),
                                                 "uncertainty_calibrated": results.get("uncertainty_calibrated"),
                                                 "qc": results.get("qc")},
          "qc": qc.load(workdir), "notes": notes}
  checkpoints_lib.export_model(out, trained.params, card)
  return card


def earlier_runs(init_from: str) -> list[dict]:
  """The training runs behind `train.init_from`'s exported models, oldest first, from their cards (a card
  from before `runs` were recorded counts as one run of its `epochs` and `training_seconds`)."""
  runs = []
  for source in loop.comma_separated(init_from):
    card_path = Path(source) / checkpoints_lib.EXPORT_META
    if not card_path.is_file():
      continue  # a training workdir, not an exported model: its own records are not in a card
    card = json.loads(card_path.read_text())
    runs += card.get("runs") or [{"workdir": card.get("checkpoint"), "epochs": card.get("epochs"),
                                  "training_seconds": card.get("training_seconds", 0.0),
                                  "trained_on": card.get("trained_on"), "init_from": None}]
  return runs
