"""predict.py's speed over a cohort: per image, reading + preprocessing, the model, writing; the one-time
compilation; images per minute; with the paper's 50 noise passes and without (one deterministic pass).

    python benchmarks/cohort_speed.py [--model pretrained/afids6] [--num-images 20] [--samples 50,0] [--prefetch on,off]

The cohort is the AFIDs test split's images (built by train.py in data/afids), repeated under new names up to
--num-images (each is read and preprocessed again: nothing is cached between images). Runs in this process
through `predict.predict_jobs`, exactly as predict.py does (one compilation, then image after image; with
prefetch "on", predict.py's default, the next image is read while the model runs, "off" reads in turn). Prints
the medians and the wall time of the whole cohort after compilation; run it alone (nothing else on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from locnet_jax import dataset  # noqa: E402
from locnet_jax.eval import cohort, predict  # noqa: E402


def cpu_name() -> str:
  for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown CPU"


def make_cohort(afids: Path, folder: Path, count: int) -> list[Path]:
  """`count` image files (symbolic links to the test split's images, under new names)."""
  manifest = dataset.load_manifest(afids / "dataset.json")
  sources = [case.image for case in manifest.cases if case.split == "test"]
  folder.mkdir(parents=True, exist_ok=True)
  images = []
  for i in range(count):
    link = folder / f"img{i:03d}.nii.gz"
    os.symlink(sources[i % len(sources)].resolve(), link)
    images.append(link)
  return images


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=str(ROOT / "pretrained" / "afids6"))
  parser.add_argument("--afids", default=str(ROOT / "data" / "afids"))
  parser.add_argument("--num-images", type=int, default=20)
  parser.add_argument("--samples", default="50,0", help="noise passes to measure, comma-separated")
  parser.add_argument("--prefetch", default="on", help="on, off or both (on,off): read the next image during the model")
  parser.add_argument("--json", default=None, help="also write the figures here")
  args = parser.parse_args()
  work = Path(tempfile.mkdtemp(prefix="cohort-speed-"))
  figures = {"model": args.model, "cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__,
             "backend": jax.default_backend(), "images": args.num_images, "runs": []}
  print(f"{figures['cpu']}, {figures['cores']} cores, JAX {jax.__version__} ({jax.default_backend()}); "
        f"model {args.model}; {args.num_images} images")
  try:
    images = make_cohort(Path(args.afids), work / "images", args.num_images)
    settings = [(int(s), p == "on") for s in args.samples.split(",") for p in args.prefetch.split(",")]
    for samples, prefetch in settings:
      out = work / f"out{samples}_{prefetch}"
      jobs = cohort.plain_jobs(images, out)
      start = time.perf_counter()
      result = predict.predict_jobs(Path(args.model), jobs, out=out, num_samples=samples, prefetch=prefetch)
      wall = time.perf_counter() - start
      assert not result.failed, result.failed
      load, model, write = (np.array([p[k] for p in result.predicted]) for k in ("load_s", "model_s", "write_s"))
      after = wall - result.compile_s  # the cohort after the one compilation (restore included)
      run = {"noise_samples": samples, "prefetch": prefetch, "compile_s": result.compile_s,
             "load_s": float(np.median(load)),
             "model_s": float(np.median(model)), "write_s": float(np.median(write)), "wall_s": wall,
             "images_per_min": 60 * len(images) / wall, "images_per_min_after_compile": 60 * len(images) / after}
      figures["runs"].append(run)
      print(f"{samples:>3} noise passes, prefetch {'on ' if prefetch else 'off'}: compile {run['compile_s']:.1f} s "
            f"once; per image (median) read+preprocess {run['load_s']:.2f} s, model {run['model_s']:.2f} s, write {run['write_s'] * 1e3:.0f} ms; "
            f"{len(images)} images in {wall:.1f} s = {run['images_per_min']:.1f} images/min "
            f"({run['images_per_min_after_compile']:.1f} after compilation)")
  finally:
    shutil.rmtree(work, ignore_errors=True)
  if args.json:
    Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
  main()
