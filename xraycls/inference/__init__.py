"""Inference from an exported model bundle: load it, preprocess images as in training, predict."""

from xraycls.inference.bundle import (
    BUNDLE_CONFIG,
    BUNDLE_WEIGHTS,
    ModelBundle,
    export_bundle,
    load_bundle,
    make_preprocessing,
)

__all__ = [
    "BUNDLE_CONFIG",
    "BUNDLE_WEIGHTS",
    "ModelBundle",
    "export_bundle",
    "load_bundle",
    "make_preprocessing",
]
