"""The paper's recipe: 4 Loc-Nets at 4, 2, 1, 0.5 mm, 56^3 patches, Adam 5e-4, batch 1, 500 epochs,
the loss-weight schedule and +-5 mm noise injection.

    python train.py --config=configs/multiscale.py --workdir=workdirs/multiscale        # paper size
    python train.py --config=configs/multiscale.py:demo --workdir=workdirs/demo         # 2 CPU cores

`demo` keeps the method and shrinks the sizes: 3 scales at 8, 4, 2 mm over a 256 mm field of view,
32^3 patches, 8 base channels, 10 epochs on synthetic data; 7 minutes on 2 CPU cores, finest-scale
validation error 5.1 mm (measured, see README). `afids_demo` is the same model on the AFIDs benchmark
(6 landmarks: AC, PC, GENU, SPLE, RLVAC, LLVAC; the set is built in data/afids6 on first use); measured
on 2 CPU cores: 10 epochs in about 40 min, finest-scale validation error 0.87 mm (constant baseline
21.8 mm; warped copies of one template, so not a claim about real scans):

    python train.py --config=configs/multiscale.py:afids_demo --workdir=workdirs/afids_demo
"""

import ml_collections

from configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = default.get_config()
  if variant in ("demo", "afids_demo"):
    config.data.spacings_mm = (8.0, 4.0, 2.0)
    config.data.finest_size = 128
    config.data.num_landmarks = 2
    config.data.num_train = 24
    config.data.num_val = 4
    config.model.patch_size = 32
    config.model.unet.base_channels = 8
    config.train.num_epochs = 10
    config.train.learning_rate = 1e-3
  if variant == "afids_demo":  # the demo's sizes on real anatomy: 6 AFIDs, built on first use
    config.data.source = "afids"
    config.data.afids_dir = "data/afids6"
  elif variant not in ("", "demo"):
    raise ValueError(f"unknown variant {variant!r} of configs/multiscale.py (known: 'demo', 'afids_demo')")
  return config
