"""Does bfloat16 compute keep the shipped model's accuracy? Same parameters, float32 vs bfloat16 U-Nets.

    python benchmarks/dtype_accuracy.py [--workdir pretrained/afids6] [--split test] [--num-samples 0]

Restores the model (an exported folder or a training run) once per `model.unet.dtype`, predicts every
case of the split of its own data set (the AFIDs benchmark for the shipped model, built on first use),
and prints the mean radial error against the ground truth for each dtype and the largest and mean
distance between the two dtypes' predictions (mm, finest scale; with --num-samples N the mean of N noise
passes, else the deterministic pass). bfloat16 runs slower than float32 on XLA:CPU; the point here is
the accuracy, the speed is measured on a GPU (model_cost.py --dtype).
"""

import argparse
import json
import sys
from pathlib import Path

import ml_collections
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from locnet_jax import dataset, xla_env

xla_env.prefer_channels_last_convolutions()  # as train.py and evaluate.py do: GPU convolutions in NDHWC
from locnet_jax import from_config
from locnet_jax.eval import predict, restore
from locnet_jax.train import checkpoints


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=str(Path(__file__).resolve().parents[1] / "pretrained" / "afids6"))
  parser.add_argument("--split", default="test")
  parser.add_argument("--num-samples", type=int, default=0)
  args = parser.parse_args()
  workdir = Path(args.workdir)
  meta = (workdir / checkpoints.EXPORT_META) if checkpoints.is_exported(workdir) else workdir / "config.json"
  saved = json.loads(meta.read_text())
  config = ml_collections.ConfigDict(saved.get("config", saved))
  manifest = dataset.load_manifest(from_config.manifest_path(config.data, seed=config.seed))
  cache = from_config.cache_dir(config.data, manifest)
  examples = from_config.load_split(manifest, args.split, from_config.preprocess_settings(config.data), cache)
  truth = np.stack([e.target_mm for e in examples])  # (N, K, 3)
  finest = {}
  for dtype in ("float32", "bfloat16"):
    config.model.unet.dtype = dtype
    trained = restore.restore(config, workdir, example=examples[0])
    predictions = predict.predict_cases(trained, examples, num_samples=args.num_samples,
                                           chunk_size=config.eval.chunk_size, seed=config.seed)
    finest[dtype] = np.stack([p["mean_mm"] if p["mean_mm"] is not None else p["pred_mm"][-1] for p in predictions])
    error = np.linalg.norm(finest[dtype] - truth, axis=-1)
    seconds = np.median([p["seconds"] for p in predictions[1:]])
    print(f"{dtype}: mean radial error {np.nanmean(error):.3f} mm (max {np.nanmax(error):.2f}) over "
          f"{len(examples)} {args.split} cases x {truth.shape[1]} landmarks; {seconds:.2f} s a case (CPU)")
  gap = np.linalg.norm(finest["bfloat16"] - finest["float32"], axis=-1)
  print(f"|bfloat16 - float32| prediction distance: mean {np.mean(gap):.3f} mm, max {np.max(gap):.3f} mm "
        f"({workdir.name}, {'deterministic pass' if not args.num_samples else f'{args.num_samples} noise passes'})")


if __name__ == "__main__":
  main()
