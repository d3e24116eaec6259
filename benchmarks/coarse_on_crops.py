"""How the coarsest scale behaves on partial fields of view: its error on the training set's field-of-view
crops, and where its heatmap puts each landmark's mass (inside the image data or in the empty part).

    python benchmarks/coarse_on_crops.py --workdir=W [--draws 40]

Draws `--draws` augmentations of the training cases with the run's own settings (its saved config), (seed 0, epoch 99, i) so
never a draw the run trained on, keeps those where a crop cut a landmark away, and prints per case: the
coarsest scale's radial error (mm) for the landmarks cut away (against their true position beyond the
edge) and for those in the image, and the share of each landmark's ReLU heatmap mass on voxels outside the
image data (the outside value: the crop and the padding). Then the medians over cases, and how often the
coarsest point falls on the empty part (nearest voxel; what prediction reads as absent). Checkpoint: the run's
latest (`which`).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locnet_jax import from_config, geometry  # noqa: E402
from locnet_jax.data import augment_host, loader  # noqa: E402
from locnet_jax.eval import restore  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--draws", type=int, default=40)
  parser.add_argument("--which", default="latest", choices=("best", "latest"))
  args = parser.parse_args()
  config = restore.saved_config(Path(args.workdir))
  data = from_config.load_data(config.data, seed=config.seed, log=lambda *_: None)
  outside = config.data.get("outside_value", 0.0)
  settings = from_config.augment_settings(config.train, outside_value=outside)
  first = data.val[0]() if callable(data.val[0]) else data.val[0]
  trained = restore.restore(config, Path(args.workdir), example=first, which=args.which)
  cut_errors, in_errors, cut_mass, in_mass, cut_absent, in_absent = [], [], [], [], [], []
  for i in range(args.draws):
    case = data.train[i % len(data.train)]
    example = case() if callable(case) else case
    out = augment_host.augment_case(example.pyramid, example.target_mm, np.random.default_rng((config.seed, 99, i)),
                                    settings)
    cut = (out.present == 0) & np.all(np.isfinite(out.target_mm), -1)
    inside = out.present == 1
    if not cut.any():
      continue
    batch = loader.collate([loader.Example("crop", out.pyramid, out.target_mm, out.present)])
    result, state = trained.model.apply({"params": trained.params}, batch["volumes"], batch["affines"],
                                        mutable=["intermediates"])
    coarse_mm = np.asarray(result["pred_mm"][0, 0])
    error = np.linalg.norm(coarse_mm - out.target_mm, axis=-1)
    heatmap = np.maximum(np.asarray(state["intermediates"]["heatmap0"][0])[0], 0)  # (X, Y, Z, K)
    empty = out.pyramid.volumes[0] == outside
    vox = np.rint(geometry.mm_to_vox(coarse_mm, out.pyramid.affines[0])).astype(int)
    on = np.all((vox >= 0) & (vox < np.asarray(empty.shape)), axis=-1)
    in_empty = np.array([bool(o and empty[tuple(v)]) or not o for v, o in zip(vox, on)])
    cut_absent += in_empty[cut].tolist()
    in_absent += in_empty[inside].tolist()
    mass = np.array([float(heatmap[..., k][empty].sum()) / max(float(heatmap[..., k].sum()), 1e-12)
                     for k in range(heatmap.shape[-1])])
    cut_errors += error[cut].tolist()
    in_errors += error[inside].tolist()
    cut_mass += mass[cut].tolist()
    in_mass += mass[inside].tolist()
    print(f"draw {i}: {100 * empty.mean():.0f} % of the grid empty; coarse error cut away "
          f"{np.round(error[cut], 1).tolist()} mm, in the image {np.round(error[inside], 1).tolist()} mm; "
          f"heatmap mass in the empty part: cut away {np.round(mass[cut], 2).tolist()}, in the image "
          f"{np.round(mass[inside], 2).tolist()}", flush=True)
  q = lambda v: np.round(np.percentile(v, [10, 50, 90]), 2).tolist() if v else None  # noqa: E731
  print(f"\n{len(cut_errors)} cut-away and {len(in_errors)} in-image landmarks over the crops (10th/50th/90th "
        f"percentiles): coarse error cut away {q(cut_errors)} mm, in the image {q(in_errors)} mm; heatmap mass "
        f"in the empty part: cut away {q(cut_mass)}, in the image {q(in_mass)}")
  print(f"coarse point on the empty part (called absent): {100 * np.mean(cut_absent):.0f} % of the cut-away, "
        f"{100 * np.mean(in_absent):.0f} % of the in-image landmarks")


if __name__ == "__main__":
  main()
