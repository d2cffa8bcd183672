"""xraycls: fine-tune ViT-B/16 on NIH ChestX-ray14 and report what it finds, how fast, at what cost."""

__version__ = "0.1.0"
