"""The model side of training: timm ViT backbone and weight sources, metrics, lr schedule, LightningModule."""

from xraycls.model.backbone import (
    DEFAULT_BACKBONE,
    TINY_BACKBONE,
    TINY_BACKBONE_KWARGS,
    WeightsUnavailableError,
    create_backbone,
    load_weights_file,
    param_groups,
)
from xraycls.model.metrics import XrayMetrics
from xraycls.model.module import XrayClassifier, pos_weight_from_prevalence
from xraycls.model.schedule import warmup_cosine

__all__ = [
    "DEFAULT_BACKBONE",
    "TINY_BACKBONE",
    "TINY_BACKBONE_KWARGS",
    "WeightsUnavailableError",
    "create_backbone",
    "load_weights_file",
    "param_groups",
    "XrayMetrics",
    "XrayClassifier",
    "pos_weight_from_prevalence",
    "warmup_cosine",
]
