"""Table 1 baseline: a single Loc-Net (U-Net + centre of mass) on the whole volume at one scale.

    python train.py --config=configs/single_scale.py --workdir=workdirs/single_scale        # paper: 1 mm
    python train.py --config=configs/single_scale.py:demo --workdir=workdirs/single_demo    # 2 CPU cores

Paper size: 224^3 at 1 mm, one more U-Net level than the multi-scale nets (footnote 2). Variants as in
configs/multiscale.py ("demo": 64^3 at 4 mm). Same data, optimiser, epochs and augmentation as the
multi-scale recipe; no noise injection, a constant loss weight. Its cost grows 8x per halving of the
spacing (the multi-scale model's by one patch net): docs/performance.md.

All Table-1 rows: `python benchmarks/table1.py --variant demo --epochs 10`; measured figures: docs/results.md.
"""

import ml_collections

from configs import multiscale


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = multiscale.use_whole_volume_grid(multiscale.get_config(variant), variant)
  config.model.kind = "single_scale"
  return config
