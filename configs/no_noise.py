"""Table 1 row: the multi-scale Loc-Net trained end to end with the paper's schedule, without noise injection.

    python train.py --config=configs/no_noise.py --workdir=workdirs/no_noise        # paper size
    python train.py --config=configs/no_noise.py:demo --workdir=workdirs/no_noise_demo

Everything as configs/multiscale.py except `train.noise=False`; evaluate it on its deterministic pass
(`--config.eval.num_noise_samples=0`), as Table 1 does.

All Table-1 rows: `python benchmarks/table1.py --variant demo --epochs 10`; measured figures: docs/results.md.
"""

import ml_collections

from configs import multiscale


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = multiscale.get_config(variant)
  config.train.noise = False
  return config
