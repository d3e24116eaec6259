"""Stage 3, training: the optimisation step, the epoch loop, checkpoints, progress and metrics."""
