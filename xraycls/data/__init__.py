"""NIH ChestX-ray14 data: labels, splits, download, cache, synthetic data, DataModule."""
