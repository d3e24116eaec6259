"""Table 1 baseline: a single Loc-Net (U-Net + centre of mass) on the whole volume at one scale.

    python train.py --config=configs/single_scale.py --workdir=workdirs/single_scale        # paper: 1 mm
    python train.py --config=configs/single_scale.py:demo --workdir=workdirs/single_demo    # 2 CPU cores

Paper size: 224^3 at 1 mm, one more U-Net level than the multi-scale nets (footnote 2). Variants as in
configs/multiscale.py ("demo": 64^3 at 4 mm). Same data, optimiser, epochs and augmentation as the
multi-scale recipe; no noise injection, a constant loss weight. Paper size on one H100: a training step
took 229 ms (2 landmarks, 12.8 GB of GPU memory; benchmarks/results/h100_model_cost.txt), so 500 epochs
of 48 volumes would take about 1.5 h.
Measured on 2 CPU cores (demo, 10 epochs, seed 0; `python benchmarks/table1.py --variant demo --epochs 10`):
about 170 s per epoch (lax's 3-D convolutions, the machine partly shared), AFIDs test split 5.94 +- 2.67 mm
(still improving: validation 9.6 mm after epoch 1, 4.99 mm after epoch 9).
"""

import ml_collections

from configs import multiscale


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = multiscale.use_whole_volume_grid(multiscale.get_config(variant), variant)
  config.model.kind = "single_scale"
  return config
