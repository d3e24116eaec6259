"""Stage 1, data: preprocessing into pyramids, augmentation (host and device), the loader, data set builders."""
