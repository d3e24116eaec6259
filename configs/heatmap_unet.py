"""Table 1 baseline: heatmap regression, a U-Net trained to output a Gaussian blob (std 6 mm) per landmark,
which predicts each landmark at its heatmap's largest voxel.

    python train.py --config=configs/heatmap_unet.py --workdir=workdirs/heatmap_unet        # paper: 1 mm
    python train.py --config=configs/heatmap_unet.py:demo --workdir=workdirs/heatmap_demo   # 2 CPU cores

Same grid as configs/single_scale.py (paper 224^3 at 1 mm; "demo" 64^3 at 4 mm), the same U-Net as the
multi-scale nets, L2 loss on the heatmaps (train.steps.heatmap_train_step);
target blobs of height 100 (`model.heatmap_peak`: with 1 the output collapses to zero). Its predictions
sit on the voxel grid (arg-max).

All Table-1 rows: `python benchmarks/table1.py --variant demo --epochs 10`; measured figures: docs/results.md.
"""

import ml_collections

from configs import multiscale


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = multiscale.use_whole_volume_grid(multiscale.get_config(variant), variant)
  config.model.kind = "heatmap"
  return config
