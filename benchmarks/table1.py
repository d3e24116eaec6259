"""Trains and evaluates every Table-1 row on the AFIDs benchmark, then gathers one table (resumable).

    python benchmarks/table1.py --variant demo --epochs 10          # CPU size; rerun to resume
    python benchmarks/table1.py --variant demo --epochs 10 --gather  # only the table from finished rows

Each row is `python train.py --config=configs/<row>.py:<variant> --workdir=<root>/<row>
--config.train.num_epochs=<epochs>` followed by `python evaluate.py` with the same flags: the same data
(data/afids, seed 0), augmentation, optimiser and epoch budget for every row. A killed run resumes from
its checkpoint when this script runs again; a finished row is not retrained. The table (<root>/table1.md)
states each row's training time (the sum of its epochs' times in metrics.jsonl, right across resumed
runs), with the constant baseline on the same test split; the violin plot of all rows is
<root>/fig4_table1.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = (("heatmap_unet", "heatmap U-Net"), ("single_scale", "single-scale Loc-Net"),
        ("multistep", "multi-scale, multi-step"), ("no_noise", "multi-scale, end to end"),
        ("multiscale", "multi-scale, end to end + noise"))


def _flags(row: str, args) -> list[str]:
  return [f"--config=configs/{row}.py:{args.variant}", f"--workdir={args.root / row}",
          f"--config.train.num_epochs={args.epochs}", f"--config.seed={args.seed}"]


# rows trained without noise are scored on their deterministic pass (the paper adds test-time noise only
# to its noise model); the noise rows on the mean of 50 noisy passes
DETERMINISTIC_ROWS = ("heatmap_unet", "single_scale", "multistep", "no_noise")


def _run(script: str, row: str, args) -> None:
  flags = _flags(row, args)
  if script == "evaluate.py" and row in DETERMINISTIC_ROWS:
    flags.append("--config.eval.num_noise_samples=0")
  print(f"$ python {script} {' '.join(flags)}", flush=True)
  subprocess.run([sys.executable, script, *flags], cwd=ROOT, check=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="demo")
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", type=Path, default=ROOT / "workdirs" / "table1")
  parser.add_argument("--rows", default=",".join(r for r, _ in ROWS))
  parser.add_argument("--gather", action="store_true", help="only gather finished rows")
  args = parser.parse_args()
  rows = [r for r in args.rows.split(",") if r]
  if not args.gather:
    for row in rows:
      results = args.root / row / "eval" / "test" / "results.json"
      if results.is_file():
        continue
      _run("train.py", row, args)
      _run("evaluate.py", row, args)
  _gather(args, rows)


def _gather(args, rows) -> None:
  from locnet_jax import io
  from locnet_jax.eval import figures

  build_info = json.loads((ROOT / "data" / "afids" / "build_info.json").read_text())
  baseline = build_info["constant_baseline_test"]
  lines = [f"AFIDs test split, `{args.variant}` sizes, {args.epochs} epochs, seed {args.seed}.", "",
           "| method | mean ± std mm | median mm | SDR 2 mm | coverage 90 % | Pearson r (p) | training time |",
           "|---|---|---|---|---|---|---|",
           f"| constant baseline (mean training position) | {baseline['mean_mm']:.2f} ± {baseline['std_mm']:.2f} | "
           f"{baseline['median_mm']:.2f} | – | – | – | – |"]
  from locnet_jax.data import afids
  try:  # the human floor: each expert vs the consensus, moved like the test cases (needs ../shared)
    raters = afids.rater_errors(ROOT / "data" / "afids", split="test")
  except (FileNotFoundError, ValueError) as e:
    raters = {}
    lines.append(f"| human raters | not available: {e} | | | | | |")
  for rater, e in raters.items():
    lines.append(f"| human {rater} (vs consensus) | {e.mean():.2f} ± {e.std():.2f} | {np.median(e):.2f} | "
                 f"{100 * np.mean(e <= 2.0):.0f} % | – | – | – |")
  errors, per_landmark = {}, {}
  for row, name in ROWS:
    path = args.root / row / "eval" / "test" / "results.json"
    if row not in rows or not path.is_file():
      continue
    r = json.loads(path.read_text())
    if row in DETERMINISTIC_ROWS and "uncertainty" in r:
      raise SystemExit(f"{path} holds noise samples, but {row} is scored deterministically: delete "
                       f"{path.parent} and rerun to evaluate it again")
    o, u = r["overall"], r.get("uncertainty", {})
    corr = f"{u['pearson_r']:.2f} ({u['pearson_p']:.1g})" if "pearson_r" in u else "–"
    cover = f"{100 * u['coverage']:.0f} %" if "coverage" in u else "–"
    if "coverage" in r.get("uncertainty_calibrated", {}):
      cover += f" (calibrated on val, ×{r['calibration']['scale']:.1f}: {100 * r['uncertainty_calibrated']['coverage']:.0f} %)"
    epochs = [json.loads(line) for line in (args.root / row / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(e["epoch_s"] for e in epochs)  # summed over epochs: right across resumed runs
    saved = json.loads((args.root / row / "config.json").read_text())
    old_conv = "conv_impl" not in saved["model"]["unet"]  # run before the 2-D-slice convolutions existed
    wall = (f"{train_s / 60:.0f} min ({len(epochs)} epochs, {train_s / len(epochs):.0f} s each)"
            + (" †" if old_conv else ""))
    lines.append(f"| {name} | {o['mean_mm']:.2f} ± {o['std_mm']:.2f} | {o['median_mm']:.2f} | "
                 f"{100 * o['sdr_2mm']:.0f} % | {cover} | {corr} | {wall} |")
    errors[name] = [e for case in r["per_case"] for e in case["error_mm"] if e is not None]
    per_landmark[name] = r
  lines += ["", "† trained with lax's 3-D convolutions (before `model.unet.conv_impl`); the other rows with the "
            "2-D-slice convolutions, about 4x faster per epoch on this CPU (same function).", ""]
  lines += _paired_tests(per_landmark)
  lines += _per_landmark_table(per_landmark, raters)
  table = "\n".join(lines) + "\n"
  io.atomic_write(args.root / "table1.md", table)
  if errors:
    figures.save_violin(args.root / "fig4_table1.png", errors)
  print(table)


# the paper's findings as pairs (better, worse) of Table-1 rows
FINDINGS = (("single-scale Loc-Net", "heatmap U-Net", "centre of mass beats heatmap regression"),
            ("multi-scale, end to end", "single-scale Loc-Net", "multi-scale beats single-scale"),
            ("multi-scale, end to end", "multi-scale, multi-step", "end to end beats multi-step"),
            ("multi-scale, end to end + noise", "multi-scale, end to end", "noise injection helps"))


def _paired_tests(results: dict) -> list[str]:
  """Each finding: both rows' errors on the same (case, landmark) pairs, Wilcoxon signed-rank p."""
  import scipy.stats
  lines = ["Paper's findings, paired over the same test landmarks (Wilcoxon signed-rank test, two-sided):", "",
           "| finding | better row mean mm | other row mean mm | better row wins | p | reproduced |",
           "|---|---|---|---|---|---|"]
  for better, worse, finding in FINDINGS:
    if better not in results or worse not in results:
      continue
    a, b = (np.array([[np.nan if e is None else e for e in c["error_mm"]] for c in results[n]["per_case"]]).ravel()
            for n in (better, worse))
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    p = scipy.stats.wilcoxon(a, b).pvalue
    verdict = "yes" if a.mean() < b.mean() and p < 0.05 else ("no: reversed" if a.mean() > b.mean() and p < 0.05
                                                               else "not significant")
    lines.append(f"| {finding} | {a.mean():.2f} | {b.mean():.2f} | {100 * np.mean(a < b):.0f} % | {p:.2g} | {verdict} |")
  return lines + [""]


def _per_landmark_table(results: dict, raters: dict) -> list[str]:
  """Mean radial error per landmark and method, the raters' mean, and the template's local contrast."""
  from locnet_jax.data import afids
  if not results:
    return []
  names = next(iter(results.values()))["landmarks"]
  try:
    contrast = afids.landmark_contrast(names)
  except (FileNotFoundError, OSError, ValueError):
    contrast = {}
  header = ["landmark", *results, "human raters (mean of 4)", "local contrast (T1w std within 5 mm)"]
  lines = ["Mean radial error (mm) per landmark on the test split:", "",
           "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for k, name in enumerate(names):
    cells = [name]
    for r in results.values():
      e = [case["error_mm"][k] for case in r["per_case"] if case["error_mm"][k] is not None]
      cells.append(f"{np.mean(e):.2f}" if e else "–")
    cells.append(f"{np.mean([e[:, k].mean() for e in raters.values()]):.2f}" if raters else "–")
    cells.append(f"{contrast[name]:.3f}" if name in contrast else "–")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


if __name__ == "__main__":
  main()
