"""Table 1 baseline: the multi-scale Loc-Net trained multi-step, one scale after another.

    python train.py --config=configs/multistep.py --workdir=workdirs/multistep        # paper size
    python train.py --config=configs/multistep.py:demo --workdir=workdirs/multistep_demo

The epochs are shared equally among the scales, coarse first; each scale trains on its own loss while the
coarser ones are frozen (their parameters do not move) and no gradient crosses a crop (stop_gradient),
as in the authors' Keras code. No noise injection: the paper adds noise only to its end-to-end model, so
this row compares with configs/no_noise.py. With 10 epochs and 3 scales the shares are 4 + 3 + 3.

All Table-1 rows: `python benchmarks/table1.py --variant demo --epochs 10`; measured figures: docs/results.md.
"""

import ml_collections

from configs import multiscale


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = multiscale.get_config(variant)
  config.model.stop_gradient = True
  config.train.schedule = "multistep"
  config.train.noise = False
  return config
