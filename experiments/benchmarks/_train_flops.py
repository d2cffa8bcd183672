"""Model FLOPs per image and the peak table behind model FLOPs utilisation (MFU) for `train_throughput.py`.

FLOPs count a multiply-add as 2. Two sources, reported side by side:

- counted: `torch.utils.flop_counter.FlopCounterMode` over one forward (eval) and one forward + backward
  (train) of the backbone at batch 1, on the meta device (shapes only, no memory, no compute). It counts
  matmuls, convolutions and attention (SDPA) exactly as the model runs them, for any timm backbone.
  MFU uses these numbers.
- formula (timm ViTs only, a cross-check): with N tokens (patches + prefix tokens), width D, depth L, MLP
  width M, Np patches of P x P x C pixels and K classes, one forward costs
  ``2*Np*C*P*P*D`` (patch embedding) ``+ L*(2*N*D*3D + 2*N*N*D + 2*N*N*D + 2*N*D*D + 2*2*N*D*M)``
  (qkv, scores, scores x values, projection, MLP) ``+ 2*D*K`` (head); training is taken as 3x that (the
  backward pass computes two matmuls per forward matmul). ViT-B/16 at 224 (N=197, D=768, L=12, M=3072):
  35.1 GFLOPs forward, 105.4 GFLOPs train per image; the counter gives 35.1 and 105.1 (its backward skips
  the input gradient of the patch embedding).

Peaks are dense (no sparsity) tensor-core rates from NVIDIA's datasheets, for 16-bit mixed precision only;
a CPU, an unlisted card or fp32 has no known peak, and MFU is then omitted (None), never guessed.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PEAK_TFLOPS", "count_flops", "vit_formula_flops", "peak_tflops", "mfu"]

# (substring of torch.cuda.get_device_name(), dense bf16/fp16 tensor TFLOP/s); first match wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),  # same compute die as H100 SXM5, more and faster memory
    ("H100 80GB HBM3", 989.4),  # H100 SXM5's device name
    ("H100 SXM", 989.4),
    ("H100 PCIe", 756.0),
    ("A100", 312.0),
)
_HALF_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true", "16-true")


def _meta_model(backbone: str, timm_kwargs: dict[str, Any]) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(backbone, pretrained=False, num_classes=15, **timm_kwargs)


def count_flops(backbone: str, timm_kwargs: dict[str, Any], input_size: int) -> dict[str, float]:
    """{"forward": FLOPs, "train": FLOPs} per image, counted by `FlopCounterMode` on the meta device."""
    model = _meta_model(backbone, timm_kwargs)
    images = torch.zeros(1, 3, input_size, input_size, device="meta")
    with FlopCounterMode(display=False) as forward_counter:
        model(images)
    with FlopCounterMode(display=False) as train_counter:
        model(images).float().sum().backward()
    return {
        "forward": float(forward_counter.get_total_flops()),
        "train": float(train_counter.get_total_flops()),
    }


def vit_formula_flops(backbone: str, timm_kwargs: dict[str, Any]) -> dict[str, float] | None:
    """{"forward", "train"} FLOPs per image by the module doc's formula; None for a non-ViT backbone."""
    model = _meta_model(backbone, timm_kwargs)
    needed = ("blocks", "patch_embed", "embed_dim", "num_prefix_tokens")
    if not all(hasattr(model, name) for name in needed) or not hasattr(model.patch_embed, "num_patches"):
        return None
    dim, depth = int(model.embed_dim), len(model.blocks)
    patches = int(model.patch_embed.num_patches)
    tokens = patches + int(model.num_prefix_tokens)
    mlp = int(model.blocks[0].mlp.fc1.out_features)
    patch_in = int(model.patch_embed.proj.weight[0].numel())  # C * P * P
    per_block = 2 * tokens * dim * 3 * dim + 4 * tokens * tokens * dim + 2 * tokens * dim * dim
    per_block += 4 * tokens * dim * mlp
    forward = 2 * patches * patch_in * dim + depth * per_block + 2 * dim * 15
    return {"forward": float(forward), "train": float(3 * forward)}


def peak_tflops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(dense peak TFLOP/s or None, the device's name) for this device at this Lightning precision."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    if precision not in _HALF_PRECISIONS:
        return None, name
    for fragment, peak in PEAK_TFLOPS:
        if fragment in name:
            return peak, name
    return None, name


def mfu(images_per_s: float | None, flops_per_image: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s over the peak (a fraction), or None when the peak or the rate is unknown."""
    if peak is None or images_per_s is None:
        return None
    return images_per_s * flops_per_image / (peak * 1e12)
