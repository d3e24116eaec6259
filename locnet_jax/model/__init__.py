"""Stage 2, model: array ops, the U-Net, the Loc-Net chain and baselines, losses, inference."""
