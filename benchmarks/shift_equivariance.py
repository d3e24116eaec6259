"""How far a Loc-Net is from shift equivariance, per down-sampling operator.

    python benchmarks/shift_equivariance.py [--seeds 5]

A textured object sits in an empty volume; the volume is shifted by whole voxels (np.roll, the object
stays far from the borders) and the prediction should move by exactly the shift. Random bias-free nets
(so the empty background gives a zero heatmap and the borders play no part), U-Net depth 2 (stride 4)
on 80^3 and depth 1 (stride 2) on 48^3. Prints the mean |error| (voxels) for shifts that are multiples
of the stride (expected 0) and for the others.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from locnet_jax.model.locnet import LocNet

SHIFTS = [(1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (1, 2, 3), (-2, -3, -1), (3, -1, 2), (4, -4, 4),
          (2, -2, 2)]


def errors(downsample: str, depth: int, n: int, seeds: int) -> np.ndarray:
  net = LocNet(1, unet=dict(depth=depth, base_channels=4, downsample=downsample))
  predict = jax.jit(lambda p, v: net.apply(p, v)[0][:, 0])
  out = []
  for seed in range(seeds):
    rng = np.random.default_rng(seed)
    volume = np.zeros((n, n, n), np.float32)
    c = n // 2
    volume[c - 3:c + 3, c - 4:c + 4, c - 2:c + 3] = rng.normal(size=(6, 8, 5))
    params = net.init(jax.random.key(seed), jnp.asarray(volume)[None])
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "bias" in jax.tree_util.keystr(path) else x, params)
    vols = np.stack([volume] + [np.roll(volume, s, axis=(0, 1, 2)) for s in SHIFTS])
    pred = np.asarray(predict(params, jnp.asarray(vols)))
    out.append(np.linalg.norm(pred[1:] - pred[0] - np.array(SHIFTS), axis=-1))
  return np.mean(out, axis=0)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args()
  print(f"mean |pred(shifted) - pred - shift| in voxels over {args.seeds} random bias-free nets")
  print("| U-Net | down-sampling | shifts multiple of stride | other shifts (mean) | other shifts (max) |")
  print("|---|---|---|---|---|")
  for depth, n in ((2, 80), (1, 48)):
    stride = 2 ** depth
    on = [i for i, s in enumerate(SHIFTS) if all(d % stride == 0 for d in s)]
    off = [i for i in range(len(SHIFTS)) if i not in on]
    for kind in ("max", "max_blur", "blur"):
      e = errors(kind, depth, n, args.seeds)
      print(f"| depth {depth}, {n}^3 | {kind} | {e[on].max():.1e} | {e[off].mean():.3f} | {e[off].max():.3f} |")


if __name__ == "__main__":
  main()
