"""Image transforms: albumentations pipelines on uint8 in the workers, one normalisation on the device.

Workers only crop, warp and adjust uint8 grayscale images (HxW in, HxW out), so batches cross to the
accelerator as uint8, a quarter of the bytes of float32. `DeviceNormalize` is the one place where uint8
becomes model input: float32, scaled, normalised and repeated to 3 channels.

Runs on albumentations 2.0 (the main stack) and 1.4 (the legacy IPU stack, where torch 2.0.1 and Lightning
2.0.9 leave pip no 2.x release; see requirements/legacy.txt): `_affine_border` and `_compose` are the only
places that differ.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import torch
from torch import Tensor

__all__ = ["TrainAugment", "build_train_transform", "build_eval_transform", "DeviceNormalize"]

_ALBUMENTATIONS_1 = int(A.__version__.split(".")[0]) < 2


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """The training augmentation settings; every field is a plain keyword of `build_train_transform`.

    The defaults are light on purpose: chest X-rays are acquired in a standard pose and their findings are
    small and lateralised, so strong crops, rotations or flips move the image away from what the test set
    looks like.
    """

    enabled: bool = True  # False: training images get the eval transform (a plain resize)
    crop_scale: tuple[float, float] = (0.8, 1.0)  # area of the random crop, as a fraction of the image
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # width/height of the random crop: near square
    affine_p: float = 0.5  # probability of the small rotate/scale/translate below
    rotate_deg: float = 7.0  # rotation drawn from [-rotate_deg, +rotate_deg] degrees
    scale: tuple[float, float] = (0.95, 1.05)  # zoom factor range of the affine step
    translate: float = 0.03  # shift drawn from [-translate, +translate] of the image size, per axis
    brightness: float = 0.1  # brightness change drawn from [-brightness, +brightness] of the range
    contrast: float = 0.1  # contrast change drawn from [-contrast, +contrast]
    brightness_contrast_p: float = 0.5  # probability of the brightness/contrast step
    hflip_p: float = 0.0  # off: the anatomy is lateralised (heart on the left); a flip is not a chest X-ray

    def __post_init__(self) -> None:
        probabilities = {
            "affine_p": self.affine_p,
            "brightness_contrast_p": self.brightness_contrast_p,
            "hflip_p": self.hflip_p,
        }
        for name, value in probabilities.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {value!r}")
        for name in ("crop_scale", "crop_ratio", "scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high:
                raise ValueError(
                    f"augment.{name} must be (low, high) with 0 < low <= high, got {(low, high)}"
                )
        if self.crop_scale[1] > 1.0:
            raise ValueError(f"augment.crop_scale cannot exceed 1.0 (the whole image), got {self.crop_scale}")
        for name in ("rotate_deg", "translate", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def from_kwargs(cls, **augment: object) -> TrainAugment:
        """Build from plain keywords (lists become tuples, as YAML gives lists); unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(augment) - known)
        if unknown:
            raise ValueError(f"unknown augment setting(s) {unknown}; known settings: {sorted(known)}")
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in augment.items()}
        return cls(**values)


def _check_size(input_size: int) -> None:
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ValueError(f"input_size must be a positive int (pixels), got {input_size!r}")


def build_train_transform(input_size: int, **augment: object) -> A.Compose:
    """Random crop to `input_size` squared plus mild geometric and intensity changes; HxW uint8 in and out.

    `augment` takes the fields of `TrainAugment`. The pipeline draws from its own generator; the datasets
    reseed it per DataLoader worker (see `xraycls.data.datasets`), so workers do not repeat each other.
    """
    _check_size(input_size)
    settings = TrainAugment.from_kwargs(**augment)
    if not settings.enabled:
        return build_eval_transform(input_size)
    steps: list[A.BasicTransform] = [
        # Linear is enough here: the crop is at most 1/0.8 of the output, a mild resample either way.
        A.RandomResizedCrop(
            size=(input_size, input_size),
            scale=settings.crop_scale,
            ratio=settings.crop_ratio,
            interpolation=cv2.INTER_LINEAR,
        ),
        A.Affine(
            rotate=(-settings.rotate_deg, settings.rotate_deg),
            scale=settings.scale,
            translate_percent=(-settings.translate, settings.translate),
            interpolation=cv2.INTER_LINEAR,
            **_affine_border(fill=0),
            p=settings.affine_p,
        ),
        A.RandomBrightnessContrast(
            brightness_limit=settings.brightness,
            contrast_limit=settings.contrast,
            p=settings.brightness_contrast_p,
        ),
    ]
    if settings.hflip_p > 0:
        steps.append(A.HorizontalFlip(p=settings.hflip_p))
    return _compose(steps)


def build_eval_transform(input_size: int) -> A.Compose:
    """Deterministic resize to `input_size` squared (area interpolation); HxW uint8 in and out."""
    _check_size(input_size)
    return _compose([A.Resize(input_size, input_size, interpolation=cv2.INTER_AREA)])


def _affine_border(fill: float) -> dict[str, Any]:
    """`A.Affine`'s constant-border keywords: `border_mode`/`fill` in 2.x, `mode`/`cval` in 1.4."""
    if _ALBUMENTATIONS_1:
        return {"mode": cv2.BORDER_CONSTANT, "cval": fill}
    return {"border_mode": cv2.BORDER_CONSTANT, "fill": fill}


def _compose(steps: Sequence[A.BasicTransform]) -> A.Compose:
    return _SeededCompose(list(steps)) if _ALBUMENTATIONS_1 else A.Compose(list(steps))


class _SeededCompose(A.Compose):
    """albumentations 1.4's `Compose` with 2.x's `set_random_seed(seed)`: a pipeline with its own generator.

    1.4 draws every random choice from Python's global `random` (numpy states are derived from it). Once
    seeded, each call swaps the pipeline's own state in and the caller's back out, so the datasets' per-worker
    and per-sample seeding works as on 2.x and the global state is left as it was. Not thread-safe: the
    DataLoader runs transforms in worker processes or in the one main thread.
    """

    _random: random.Random | None = None

    def set_random_seed(self, seed: int | None) -> None:
        self._random = random.Random(seed)

    def __call__(self, *args: Any, **data: Any) -> dict[str, Any]:
        if self._random is None:
            return super().__call__(*args, **data)
        caller_state = random.getstate()
        random.setstate(self._random.getstate())
        try:
            return super().__call__(*args, **data)
        finally:
            self._random.setstate(random.getstate())
            random.setstate(caller_state)


def _per_channel(value: float | Sequence[float], channels: int, name: str) -> Tensor:
    values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != channels:
        raise ValueError(
            f"{name} needs 1 or {channels} values (one per channel), got {len(values)}: {values}"
        )
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


class DeviceNormalize(torch.nn.Module):
    """uint8 images [B,H,W] or [B,1,H,W] (or already [B,C,H,W]) -> float32 [B,C,H,W] = (x/255 - mean)/std.

    The default 0.5/0.5 maps 0..255 to -1..1, what the ViT ImageNet-21k weights were trained on. Mean and
    std are non-persistent buffers: they follow `.to(device)` but stay out of any state dict.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5, channels: int = 3
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        mean_t = _per_channel(mean, channels, "mean")
        std_t = _per_channel(std, channels, "std")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be > 0 per channel, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        # x * scale - shift equals (x/255 - mean)/std, in one fused kernel (addcmul) per batch.
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", mean_t / std_t, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"DeviceNormalize expects uint8 images, got {images.dtype}")
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] not in (1, self.channels):
            raise ValueError(
                f"DeviceNormalize expects [B,H,W], [B,1,H,W] or [B,{self.channels},H,W], "
                f"got {list(images.shape)}"
            )
        # A single gray channel broadcasts against the [1,C,1,1] buffers: gray -> C channels for free.
        return torch.addcmul(-self.shift, images.float(), self.scale)

    def extra_repr(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"mean={mean}, std={std}, channels={self.channels}"
