"""Host augmentation time per case with the real-scan variation: against the per-voxel field evaluation,
and with the finest level computed only around the landmarks.

    python benchmarks/augment_speed.py [--sizes demo,paper] [--repeats 5]
    python benchmarks/augment_speed.py --region [--margins 40,30] [--repeats 5]

The AFIDs T1w template (../shared or the wheel) preprocessed at the demo size (3 levels 8/4/2 mm, 128^3
finest) and optionally the paper size (448^3 finest), augmented by `augment_host.augment_case` with
`configs/multiscale.py:afids6_real`'s settings (deformation, lookup table, bias field, blur, thick slices,
field of view), every call a new draw. Two ways in the same run: "separable" (the code as it is: the
displacement and bias fields evaluated on world-aligned grids by `DisplacementField.on_grid`'s three small
matrix products, `augment_host.warp_volume`), and "per voxel" (the baseline: each field interpolated at
every voxel centre and the image resampled through `preprocess.resample`'s world map). Median of
`--repeats` cases after one warm-up, one process, seconds per case. Also checks the two agree.

`--region`: `configs/multiscale.py:afids32`'s settings and size (8/4/2/1 mm, 256^3 finest) with the 32
AFIDs consensus landmarks, the whole grid (`finest_margin_mm` 0) against the finest level computed within
each margin of the landmarks (`augment_host.finest_region`); the largest difference inside the region, 4
voxels from its faces (where blur and thick slices see the region's edge), with the noise off.
"""

import argparse
import contextlib
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed  # noqa: E402

from configs import multiscale  # noqa: E402
from locnet_jax import from_config  # noqa: E402
from locnet_jax.data import afids, augment_host, loader, preprocess, variation  # noqa: E402

SIZES = {"demo": dict(spacings_mm=(8.0, 4.0, 2.0), finest_size=128),
         "paper": dict(spacings_mm=(4.0, 2.0, 1.0, 0.5), finest_size=448)}


@contextlib.contextmanager
def per_voxel():
  """The baseline: fields interpolated at every voxel centre, the warp through `preprocess.resample`."""
  on_grid, warp = variation.DisplacementField.on_grid, augment_host.warp_volume

  def field_at_voxels(self, affine, shape, rows=slice(None)):
    points = variation.voxel_centres_mm(affine, shape).reshape(*shape, 3)[rows]
    return self(points.reshape(-1, 3)).reshape(*points.shape[:3], -1)

  def resample_warp(volume, affine, transform, field, *, slab=32, out_grid=None):
    out_affine, out_shape = out_grid if out_grid is not None else (affine, volume.shape)
    return preprocess.resample(volume, affine, target_affine=out_affine, target_shape=out_shape,
                               world_map=augment_host.source_points(transform, field))

  variation.DisplacementField.on_grid, augment_host.warp_volume = field_at_voxels, resample_warp
  try:
    yield
  finally:
    variation.DisplacementField.on_grid, augment_host.warp_volume = on_grid, warp


def region_table(args) -> None:
  config = multiscale.get_config("afids32")
  settings = from_config.augment_settings(config.train)
  files = afids.read_source_files(roles=("T1w", "afids"))
  points = afids.parse_afids(files["afids"])
  print(f"afids32 size, {len(points)} landmarks, median of {args.repeats} draws after one")
  print("| finest margin mm | s/case | whole grid s/case (same run) | ratio | finest voxels computed | max difference |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    image = Path(tmp) / "t1w.nii.gz"
    image.write_bytes(files["T1w"])
    pyramid = loader.compute_pyramid(image, from_config.preprocess_settings(config.data))

    def run(margin, i, noise=settings.noise_std):
      draw = dataclasses.replace(settings, finest_margin_mm=margin, noise_std=noise)
      return augment_host.augment_case(pyramid, points, np.random.default_rng((0, 0, i)), draw)

    for margin in [float(m) for m in args.margins.split(",")]:
      draws = iter(range(10 ** 6))
      whole, _, _ = timed(lambda: run(0.0, next(draws)), 1, args.repeats)
      draws = iter(range(10 ** 6))
      part, _, _ = timed(lambda: run(margin, next(draws)), 1, args.repeats)
      a, b = run(0.0, 7, 0.0), run(margin, 7, 0.0)
      region = augment_host.finest_region(pyramid.affines[-1], pyramid.volumes[-1].shape, a.target_mm,
                                          margin_mm=margin)
      inner = tuple(slice(r.start + 4, r.stop - 4) for r in region)
      share = np.prod([r.stop - r.start for r in region]) / pyramid.volumes[-1].size
      difference = float(np.max(np.abs(a.pyramid.volumes[-1][inner] - b.pyramid.volumes[-1][inner])))
      print(f"| {margin:g} | {part:.2f} | {whole:.2f} | {whole / part:.1f}x | {share:.0%} | {difference:.1e} |",
            flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="demo")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--region", action="store_true", help="the finest region against the whole grid (afids32)")
  parser.add_argument("--margins", default="40,30")
  args = parser.parse_args()
  if args.region:
    return region_table(args)
  settings = from_config.augment_settings(multiscale.get_config("afids6_real").train)
  files = afids.read_source_files(roles=("T1w",))
  print("| size | separable s/case | per voxel s/case | ratio | max difference |")
  print("|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    image = Path(tmp) / "t1w.nii.gz"
    image.write_bytes(files["T1w"])
    for size in args.sizes.split(","):
      pyramid = loader.compute_pyramid(image, loader.PreprocessSettings(**SIZES[size], intensity="mr"))
      points = np.zeros((6, 3))
      run = lambda i: augment_host.augment_case(pyramid, points, np.random.default_rng((0, 0, i)), settings)  # noqa: E731
      draws = iter(range(10 ** 6))
      fast, _, _ = timed(lambda: run(next(draws)), 1, args.repeats)
      with per_voxel():
        draws = iter(range(10 ** 6))
        slow, _, _ = timed(lambda: run(next(draws)), 1, args.repeats)
        reference = run(7).pyramid.volumes[-1]
      difference = float(np.max(np.abs(run(7).pyramid.volumes[-1] - reference)))
      print(f"| {size} | {fast:.2f} | {slow:.2f} | {slow / fast:.1f}x | {difference:.1e} |", flush=True)


if __name__ == "__main__":
  main()
