"""The NIH ChestX-ray14 label set, in the order every xraycls table, tensor and report uses."""

from __future__ import annotations

__all__ = ["FINDINGS", "NO_FINDING", "LABELS", "NUM_LABELS"]

# The 14 findings of Wang et al. (CVPR 2017) in the order of the NIH release notes.
FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
# The guide trained on all 15 columns; the literature reports the mean over the 14 findings.
LABELS: tuple[str, ...] = (*FINDINGS, NO_FINDING)
NUM_LABELS = len(LABELS)
