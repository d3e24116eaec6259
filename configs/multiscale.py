"""The paper's recipe: 4 Loc-Nets at 4, 2, 1, 0.5 mm, 56^3 patches, Adam 5e-4, batch 1, 500 epochs,
the loss-weight schedule and +-5 mm noise injection.

    python train.py --config=configs/multiscale.py --workdir=workdirs/multiscale        # paper size
    python train.py --config=configs/multiscale.py:demo --workdir=workdirs/demo         # 2 CPU cores

`demo` keeps the method and shrinks the sizes: 3 scales at 8, 4, 2 mm over a 256 mm field of view,
32^3 patches, 8 base channels, few epochs; a few minutes on 2 CPU cores.
"""

import ml_collections

from configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = default.get_config()
  if variant == "demo":
    config.data.spacings_mm = (8.0, 4.0, 2.0)
    config.data.finest_size = 128
    config.data.num_landmarks = 2
    config.data.num_train = 24
    config.data.num_val = 4
    config.model.patch_size = 32
    config.model.unet.base_channels = 8
    config.train.num_epochs = 10
    config.train.learning_rate = 1e-3
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/multiscale.py (known: 'demo')")
  return config
