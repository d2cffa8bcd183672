"""The model: timm ViT backbone and weight sources (`backbone`), metrics (`metrics`), lr schedule
(`schedule`), the LightningModule (`module`).

Nothing is imported here, so `xraycls.model.backbone` loads with torch and timm alone: inference (a bundle
scored and served) never pulls in Lightning or torchmetrics.
"""
