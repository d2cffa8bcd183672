"""Heatmaps: where the model found the evidence for one finding, by HiResCAM over every ViT block's tokens.

HiResCAM (Draelos & Carin 2020, arXiv:2011.08891): at each block, the patch tokens entering its attention
(``blocks[b].norm1``'s output, prefix tokens dropped) times the gradient of the finding's logit with respect
to them, summed over features, ReLU, resized to the input and divided by its maximum; the heatmap is the
mean of those maps, divided by its maximum: values in [0, 1], relative within one image and finding. A
gradient method makes the map class-specific (attention rollout is the same for every finding); the tokens
entering a block get a gradient even in a CLS-token ViT; per-token gradients and the mean over blocks
localised the demo's planted marks best, as measured in
``experiments/results/heatmaps_method_2026-11-27.md``.
Works on timm VisionTransformers (``patch_embed``, ``blocks[i].norm1``), CLS-token or pooled.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from xraycls.disclaimer import DISCLAIMER
from xraycls.files import save_png
from xraycls.inference.bundle import ModelBundle

__all__ = ["HEATMAP_METHOD", "heatmap", "heatmaps", "save_heatmaps"]

log = logging.getLogger(__name__)

HEATMAP_METHOD = "HiResCAM (Grad-CAM, per-token gradients) averaged over the ViT blocks' input tokens"
_OVERLAY_ALPHA = 0.45
_DPI = 110


def _vit_parts(model: nn.Module) -> tuple[tuple[int, int], int, list[nn.Module]]:
    """(patch grid (gh, gw), number of prefix tokens, the modules whose outputs are the CAM activations)."""
    patch_embed, blocks = getattr(model, "patch_embed", None), getattr(model, "blocks", None)
    if patch_embed is None or not blocks or not all(hasattr(block, "norm1") for block in blocks):
        raise ValueError(
            f"heatmap: {type(model).__name__} is not a timm VisionTransformer (needs patch_embed and "
            f"blocks[i].norm1)"
        )
    prefix = getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)
    grid_h, grid_w = (int(n) for n in patch_embed.grid_size)
    return (grid_h, grid_w), int(prefix), [block.norm1 for block in blocks]


def heatmaps(model: nn.Module, image: Tensor, label_indices: Sequence[int]) -> list[np.ndarray]:
    """One heatmap per output index in `label_indices` (LABELS order), from one forward pass (module doc).

    `image` is one normalised input, float [1, 3, H, W] (what `ModelBundle.preprocess` gives), on any
    device; it runs on the model's device. Returns float32 [H, W] arrays in [0, 1].
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    (grid_h, grid_w), prefix, targets = _vit_parts(model)
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"heatmap: image must be one normalised input [1, 3, H, W], got {list(image.shape)}")
    device = next(model.parameters()).device
    captured: list[Tensor] = []
    handles = [
        target.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        for target in targets
    ]
    was_training = model.training
    model.eval()
    try:
        # Gradients even when the caller runs in inference mode; only activation gradients are taken
        # (autograd.grad), so no parameter's .grad is touched.
        with torch.inference_mode(False), torch.enable_grad():
            x = image.detach().clone().to(device=device, dtype=torch.float32).requires_grad_(True)
            logits = model(x)
            tokens = captured[-len(targets) :]  # one per block, in order
            num_outputs = logits.shape[1]
            bad = [i for i in label_indices if not 0 <= int(i) < num_outputs]
            if bad:
                raise ValueError(f"heatmap: label indices {bad} outside the model's {num_outputs} outputs")
            grads = [
                torch.autograd.grad(logits[0, int(i)], tokens, retain_graph=k < len(label_indices) - 1)
                for k, i in enumerate(label_indices)
            ]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    activations = [block_tokens[0, prefix:].detach().float() for block_tokens in tokens]
    if activations[0].shape[0] != grid_h * grid_w:
        raise ValueError(
            f"heatmap: {activations[0].shape[0]} patch tokens for a {grid_h} x {grid_w} patch grid; the "
            f"input {list(image.shape[2:])} is not the size the model was built for"
        )
    size = (int(image.shape[2]), int(image.shape[3]))
    return [_mean_cam(activations, block_grads, prefix, (grid_h, grid_w), size) for block_grads in grads]


def _mean_cam(
    activations: Sequence[Tensor],
    grads: Sequence[Tensor],
    prefix: int,
    grid: tuple[int, int],
    size: tuple[int, int],
) -> np.ndarray:
    """The mean of the blocks' normalised HiResCAM maps, normalised: float32 [H, W] in [0, 1]."""
    maps = [
        _normalised(_cam(acts, grad[0, prefix:].float(), grid, size))
        for acts, grad in zip(activations, grads, strict=True)
    ]
    return _normalised(torch.stack(maps).mean(dim=0)).cpu().numpy().astype(np.float32)


def _cam(activations: Tensor, grad: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    # HiResCAM: each token's activation times its own gradient, summed over features (no token averaging).
    cam = torch.relu((grad * activations).sum(dim=1)).reshape(1, 1, *grid)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]


def _normalised(cam: Tensor) -> Tensor:
    """`cam` / its maximum, in [0, 1]; all zeros where nothing is positive."""
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return cam.clamp(0.0, 1.0)


def heatmap(model: nn.Module, image: Tensor, label_index: int) -> np.ndarray:
    """The heatmap of output `label_index` (LABELS order) for one input [1, 3, H, W]: float32 [H, W], 0..1."""
    return heatmaps(model, image, [label_index])[0]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def _overlay(image_u8: np.ndarray, heat: np.ndarray, title: str, out: Path) -> Path:
    """Write the overlay PNG; its title is also stored in the PNG's text chunks (Title, Description)."""
    fig = Figure(figsize=(5.2, 5.6))
    FigureCanvasAgg(fig)  # Agg on this figure only: no pyplot state
    ax = fig.add_subplot()
    ax.imshow(image_u8, cmap="gray", vmin=0, vmax=255)
    shown = ax.imshow(heat, cmap="jet", alpha=_OVERLAY_ALPHA, vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="relative evidence (HiResCAM)")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    metadata = {"Title": title.replace("\n", " | "), "Description": DISCLAIMER, "Software": "xraycls"}
    return save_png(fig, out, dpi=_DPI, bbox_inches="tight", metadata=metadata)


def save_heatmaps(
    bundle: ModelBundle,
    image_u8: np.ndarray,
    probs: np.ndarray,
    out_dir: Path,
    name: str,
    findings: Sequence[str],
) -> list[Path]:
    """Write one overlay PNG per finding: ``out_dir/<name>__<finding>.png`` (unsafe characters -> ``_``).

    `image_u8` is the image as the model saw it before resizing: uint8 [image_size, image_size], what
    `load_xray(path, image_size)` gives; `probs` its float [len(labels)] probabilities in `bundle.labels`
    order. Each figure shows the image, the heatmap (resized to the image) in a colour map, and a title
    naming the image, the finding, its probability, the method and the disclaimer (also in the PNG's
    ``Title`` and ``Description`` text chunks). Runs on the bundle model's device. Raises ValueError for
    an unknown finding or a wrongly shaped image or probs.
    """
    unknown = [finding for finding in findings if finding not in bundle.labels]
    if unknown:
        raise ValueError(f"heatmaps for {name}: unknown findings {unknown}; known: {bundle.labels}")
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if probs.shape[0] != len(bundle.labels):
        raise ValueError(
            f"heatmaps for {name}: probs must hold {len(bundle.labels)} values, got {probs.shape[0]}"
        )
    if not findings:
        return []
    image_u8 = np.asarray(image_u8)
    try:
        batch = bundle.to_uint8_batch([image_u8])  # checks dtype and size
    except ValueError as err:
        raise ValueError(f"heatmaps for {name}: {err}") from err
    x = bundle.normalize(batch.to(bundle.normalize.scale.device))
    indices = [bundle.labels.index(finding) for finding in findings]
    maps = heatmaps(bundle.model, x, indices)
    height, width = image_u8.shape
    written = []
    for finding, index, heat in zip(findings, indices, maps, strict=True):
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
        title = f"{name}\n{finding}: p = {probs[index]:.3f}\n{HEATMAP_METHOD}\n{DISCLAIMER}"
        out = Path(out_dir) / f"{_safe_name(name)}__{_safe_name(finding)}.png"
        written.append(_overlay(image_u8, np.clip(heat, 0.0, 1.0), title, out))
    log.info("wrote %d heatmaps for %s to %s", len(written), name, out_dir)
    return written
