"""Scoring any model bundle on any split: point metrics, patient-level bootstrap intervals, paired
comparisons (bootstrap and DeLong), calibration, and the `xraycls evaluate` / `xraycls compare` jobs.
Imports torch, numpy, scipy, scikit-learn and matplotlib, and of xraycls only `findings`, `files`, `data`
(cache, splits, datasets), `inference` and `report` (no Lightning, Hydra, torchmetrics or the
LightningModule), so a bundle is scored with torch + timm alone.
"""
