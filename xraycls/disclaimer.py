"""The one disclaimer every xraycls output carries (predictions, figures, heatmaps, ONNX metadata).

A leaf module, importing nothing, so any part of the package can use it without import cycles.
"""

__all__ = ["DISCLAIMER"]

DISCLAIMER = "xraycls output is an aid to be checked by a radiologist, not a diagnosis."
