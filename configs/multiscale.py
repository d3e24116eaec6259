"""The paper's recipe: 4 Loc-Nets at 4, 2, 1, 0.5 mm, 56^3 patches, Adam 5e-4, batch 1, 500 epochs,
the loss-weight schedule, +-5 mm noise injection, trained end to end (Table 1, last row).

    python train.py --config=configs/multiscale.py --workdir=workdirs/multiscale        # paper size
    python train.py --config=configs/multiscale.py:demo --workdir=workdirs/demo         # 2 CPU cores

With no data set named, both train on the AFIDs benchmark (6 landmarks: AC, PC, GENU, SPLE, RLVAC,
LLVAC), built in data/afids on first use (locnet_jax/data/afids.py: the template images from the PyPI
wheel autoafids==0.1.4, or from the folder named in $LOCNET_AFIDS_SOURCE).

Variants (the sizes; every other Table-1 config derives from these):
  ""              paper size: 448^3 at 0.5 mm (224 mm field of view), 4 scales, 500 epochs of 48 volumes;
                  for a GPU, where "auto" keeps the training set on the device and augments it there.
                  Not yet run; its expected time: docs/performance.md.
  "demo"          2 CPU cores: 3 scales at 8, 4, 2 mm over 256 mm, 24^3 patches, 8 base channels,
                  15 epochs (the README's first command).
  "afids6"        the demo's sizes for 50 epochs: the shipped model pretrained/afids6, exported with
                  python export_model.py --config=configs/multiscale.py:afids6 --workdir=workdirs/afids6 \\
                      --out=pretrained/afids6
  "afids6_real"   "afids6" from scratch with the real-scan variation (use_real_scan_variation, cosine
                  learning rate), 75 epochs: the shipped default pretrained/afids6_real (T2w 1.67 mm where
                  afids6 gives 12.6; docs/results.md, "The shipped real-scan model"), exported with
                  python export_model.py --config=configs/multiscale.py:afids6_real --workdir=workdirs/afids6_real \\
                      --out=pretrained/afids6_real
  "afids6_real_ft" the same variation, fine-tuning pretrained/afids6 for 15 epochs (flat loss weights,
                  cosine learning rate): measured worse on another contrast (docs/results.md)
  "afids32"       all 32 AFIDs at 1 mm: 4 scales at 8, 4, 2, 1 mm over 256 mm (32^3 to 256^3), 24^3 patches,
                  8 base channels, 25 epochs of the afids6_real recipe (the real-scan variation, cosine
                  learning rate; the finest level augmented only within 40 mm of the landmarks), its own
                  benchmark in data/afids32 (72 min on 2 cores; resumable: rerun the same command); shipped as
                  pretrained/afids32 (continued by "afids32_more"; its figures: docs/results.md)
  "afids32_more"  25 more epochs of "afids32" from its export pretrained/afids32 (flat loss weights, cosine
                  learning rate from 3e-4 after 2 epochs of warm-up, the finer scales conditioned on the
                  landmark): how training continues past one session on machines that keep
                  nothing but the repository; export the run over pretrained/afids32 to chain another
  "synthetic_demo" the demo's sizes on synthetic blob images made in memory (no files, no build; fast
                  tests and a smoke run).

Measured figures (training time, errors, uncertainty): docs/results.md; speed: docs/performance.md.
"""

import ml_collections

from configs import default
from locnet_jax.data import afids

VARIANTS = ("", "demo", "afids6", "afids6_real", "afids6_real_ft", "afids32", "afids32_more", "synthetic_demo")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} (known: {', '.join(repr(v) for v in VARIANTS)})")
  config = default.get_config()
  if variant in ("demo", "afids6", "afids6_real", "afids6_real_ft", "afids32", "afids32_more", "synthetic_demo"):
    config.data.spacings_mm = (8.0, 4.0, 2.0)
    config.data.finest_size = 128
    config.model.patch_size = 24
    config.model.unet.base_channels = 8
    config.train.num_epochs = 15
    config.train.learning_rate = 1e-3
  if variant in ("afids6", "afids6_real", "afids6_real_ft", "afids32", "afids32_more"):
    config.train.num_epochs = 50
  if variant in ("afids32", "afids32_more"):  # one more level: 1 mm, the raters' resolution
    config.data.spacings_mm = (8.0, 4.0, 2.0, 1.0)
    config.data.finest_size = 256
    config.data.afids_dir = "data/afids32"
    config.data.afids_landmarks = ",".join(afids.AFID_NAMES)
    # the 256^3 finest level is 87 % of the host's augmentation; its 24 mm crops (+-5 mm noise) read only
    # within 17 mm of the 2 mm scale's prediction: compute it within 40 mm of the landmarks (3.3x less work)
    config.train.augmentation.finest_margin_mm = 40.0
  if variant in ("afids6_real", "afids6_real_ft", "afids32", "afids32_more"):
    use_real_scan_variation(config)
  if variant in ("afids32", "afids32_more"):  # 170-190 s an epoch on 2 cores (AMD EPYC): 25 epochs fit
    config.train.num_epochs = 25  # one 3-hour session with their evaluation
    config.train.loader_workers = 1  # with the finest region one worker keeps ahead of the training step
  if variant == "afids6_real":  # 50 epochs reached 0.97 mm on plain validation, still falling (docs/results.md)
    config.train.num_epochs = 75
  if variant in ("afids6_real", "afids32", "afids32_more"):  # the learning rate falls to 0 over the run (converges
    config.train.lr_schedule = "cosine"  # at the end); crops, when on, down to 20 mm (partial acquisitions
    config.train.augmentation.fov_min_mm = 20.0  # as thin as 30 mm exist)
  if variant == "afids32_more":  # continued from the export; run from the repository root
    config.train.init_from = "pretrained/afids32"
    config.train.schedule = "flat"
    # each continuation's first epochs at a peak of 5e-4 set the validation back (1.62 -> 2.59 mm in the third
    # run, even with 2 epochs of warm-up; regained after 5): from the fourth on, 3e-4 (docs/results.md)
    config.train.learning_rate = 3e-4
    config.train.warmup_epochs = 2
    config.model.landmark_film = True  # 10 epochs with: validation 1.54 mm, without: 1.64 (docs/results.md)
    # a third of the fifth run's error was a fixed offset per landmark, the same on its own training cases
    # (0.69 mm) as on validation and test: learnt per landmark from the sixth run on (docs/results.md)
    config.model.landmark_offset = True
    # the fourth run, at these settings: validation 1.54 -> 1.31 mm (best at epoch 20 of 25), the fifth
    # 1.31 -> 1.21 (epoch 24), the sixth (with landmark_offset) 1.21 -> 1.03 (epoch 13 of 19; docs/results.md)
  if variant == "afids6_real_ft":  # fine-tuned from the plain model; run from the repository root
    config.train.init_from = "pretrained/afids6"
    config.train.schedule = "flat"
    config.train.num_epochs = 15
    config.train.learning_rate = 5e-4
    config.train.lr_schedule = "cosine"
  if variant == "synthetic_demo":
    config.data.source = "synthetic"
    config.data.num_landmarks = 2
    config.data.num_train = 24
    config.data.num_val = 4
    config.train.num_epochs = 10
  return config


def use_real_scan_variation(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Train for what one template does not show (docs/design.md, "Real scans"): another individual's anatomy
  (a deformation of up to 4 mm at 20-60 mm wavelengths, +-8 % per-axis size), another contrast (a random
  intensity lookup table for half the cases, which can reorder tissue brightness; bias field, blur, thick
  slices) and another position (+-15 mm). No field-of-view crops (`fov_probability` 0): cutting 30 % of
  the cases to slabs held the training back (from scratch, 3.05 mm on plain validation after 50 epochs
  against 0.97 mm without them) and taught neither slabs nor presence (docs/results.md, "Without
  field-of-view crops"); `--config.train.augmentation.fov_probability=0.3` turns them back on. No learnt
  presence output: the heatmaps' mass was measured to carry no signal (docs/results.md)."""
  aug = config.train.augmentation
  aug.max_translation_mm = 15.0
  aug.deform_mm = 4.0
  aug.max_axis_scale = 0.08
  aug.lut_probability = 0.5
  aug.max_bias_log = 0.3
  aug.max_blur_mm = 1.5
  aug.thick_probability = 0.2
  aug.fov_probability = 0.0
  config.train.augment_on = "host"  # the loader's workers (a GPU run may pass --config.train.augment_on=device)
  config.train.loader_workers = 2  # the host's augmentation costs ~4x the plain one per case
  return config


def use_whole_volume_grid(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """One pyramid level for the single-volume baselines: the multi-scale model's second-finest spacing.

  Paper: 1 mm, 224^3 (the same 224 mm field of view; 0.5 mm does not fit in memory). Demo sizes: 4 mm,
  64^3 over the demo's 256 mm. No noise injection (it shifts a finer crop these models do not have).
  """
  config.data.spacings_mm = (1.0,) if variant == "" else (4.0,)
  config.data.finest_size = 224 if variant == "" else 64
  config.train.noise = False
  return config
