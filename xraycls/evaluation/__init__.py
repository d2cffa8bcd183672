"""Scoring any model's outputs on any split: point metrics, patient-level bootstrap intervals, paired
comparisons (bootstrap and DeLong) and calibration. Imports numpy, scipy, scikit-learn and torch only
(no Lightning, Hydra or torchmetrics) and nothing of xraycls but `xraycls.findings`.
"""
