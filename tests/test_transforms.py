"""Worker-side uint8 transforms and the one device-side normalisation."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch

from xraycls.data.transforms import (
    DeviceNormalize,
    TrainAugment,
    build_eval_transform,
    build_train_transform,
)

# No randomness left except the flip: full-image square crop, no affine step, no intensity change.
_ONLY_FLIP = {
    "crop_scale": (1.0, 1.0),
    "crop_ratio": (1.0, 1.0),
    "affine_p": 0.0,
    "brightness_contrast_p": 0.0,
}


def _gradient_image(size: int = 64) -> np.ndarray:
    """Bright on the left, dark on the right (like a lateralised feature), with some texture."""
    columns = np.linspace(255, 0, size, dtype=np.float32)
    rng = np.random.default_rng(0)
    image = columns[None, :] + rng.normal(0, 5, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def test_train_transform_gives_uint8_at_input_size_and_varies() -> None:
    transform = build_train_transform(56)
    image = _gradient_image()
    outputs = [transform(image=image)["image"] for _ in range(4)]
    for out in outputs:
        assert out.shape == (56, 56)
        assert out.dtype == np.uint8
    assert any(not np.array_equal(outputs[0], other) for other in outputs[1:])


def test_train_transform_is_reproducible_from_its_seed() -> None:
    image = _gradient_image()
    first, second = build_train_transform(56), build_train_transform(56)
    first.set_random_seed(123)
    second.set_random_seed(123)
    for _ in range(3):
        np.testing.assert_array_equal(first(image=image)["image"], second(image=image)["image"])


def test_a_seeded_pipeline_has_its_own_generator() -> None:
    """Draws elsewhere do not change its output, and it leaves the caller's `random` state as it was (on
    albumentations 1.4, the legacy stack, this is our `_SeededCompose`; 2.x has it built in)."""
    image = _gradient_image()
    quiet, busy = build_train_transform(56), build_train_transform(56)
    quiet.set_random_seed(5)
    busy.set_random_seed(5)
    expected = [quiet(image=image)["image"] for _ in range(3)]
    for output in expected:
        state = random.getstate()
        random.random()  # the caller draws between the pipeline's calls
        after_draw = random.getstate()
        np.testing.assert_array_equal(busy(image=image)["image"], output)
        assert random.getstate() == after_draw != state


def test_eval_transform_is_a_deterministic_area_resize() -> None:
    transform = build_eval_transform(56)
    image = _gradient_image()
    out = transform(image=image)["image"]
    np.testing.assert_array_equal(out, transform(image=image)["image"])
    np.testing.assert_array_equal(out, cv2.resize(image, (56, 56), interpolation=cv2.INTER_AREA))


def test_no_horizontal_flip_by_default_and_flip_when_asked() -> None:
    image = _gradient_image()
    default = build_train_transform(56)
    for _ in range(20):
        out = default(image=image)["image"].astype(np.float32)
        assert out[:, :28].mean() > out[:, 28:].mean()  # bright side stays on the left
    flipped = build_train_transform(56, hflip_p=1.0, **_ONLY_FLIP)(image=image)["image"]
    expected = cv2.resize(image, (56, 56), interpolation=cv2.INTER_LINEAR)[:, ::-1]
    np.testing.assert_allclose(flipped.astype(int), expected.astype(int), atol=1)


def test_disabled_augmentation_equals_eval_transform() -> None:
    image = _gradient_image()
    train = build_train_transform(56, enabled=False)
    np.testing.assert_array_equal(train(image=image)["image"], build_eval_transform(56)(image=image)["image"])


def test_augment_settings_from_yaml_lists() -> None:
    settings = TrainAugment.from_kwargs(crop_scale=[0.9, 1.0], rotate_deg=3)
    assert settings.crop_scale == (0.9, 1.0)
    assert settings.rotate_deg == 3


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ({"hflip": 0.5}, "unknown augment setting(s) ['hflip']"),
        ({"affine_p": 1.5}, "augment.affine_p must be a probability"),
        ({"crop_scale": (0.9, 0.8)}, "augment.crop_scale must be (low, high)"),
        ({"crop_scale": (0.9, 1.2)}, "augment.crop_scale cannot exceed 1.0"),
        ({"rotate_deg": -1}, "augment.rotate_deg must be >= 0"),
    ],
)
def test_bad_augment_settings_are_named(augment: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        build_train_transform(56, **augment)
    assert message in str(error.value)


def test_bad_input_size() -> None:
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        build_eval_transform(0)


def test_device_normalize_maps_0_255_to_minus_one_one_on_three_channels() -> None:
    normalize = DeviceNormalize()
    images = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8)  # [B=1, H=2, W=2]
    out = normalize(images)
    assert out.shape == (1, 3, 2, 2)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.full((3,), -1.0))
    assert torch.allclose(out[0, :, 0, 1], torch.full((3,), 1.0))
    assert torch.allclose(out[0, :, 1, 0], torch.full((3,), 128 / 255 * 2 - 1), atol=1e-6)
    # [B,1,H,W] gives the same as [B,H,W]
    assert torch.equal(normalize(images.unsqueeze(1)), out)


def test_device_normalize_per_channel_matches_the_formula() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalize = DeviceNormalize(mean=mean, std=std)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean_t) / std_t
    assert torch.allclose(normalize(images), expected, atol=1e-5)


def test_device_normalize_buffers_follow_the_module_but_stay_out_of_state_dict() -> None:
    normalize = DeviceNormalize()
    assert normalize.state_dict() == {}
    moved = normalize.to("meta")
    assert moved.mean.device.type == "meta"
    assert moved.scale.device.type == "meta"


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 8, 8), "expects uint8 images"),
        (torch.zeros(2, 2, 8, 8, dtype=torch.uint8), r"expects \[B,H,W\]"),
        (torch.zeros(8, 8, dtype=torch.uint8), r"expects \[B,H,W\]"),
    ],
)
def test_device_normalize_rejects_bad_batches(images: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeviceNormalize()(images)


def test_device_normalize_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="mean needs 1 or 3 values"):
        DeviceNormalize(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be > 0"):
        DeviceNormalize(std=0.0)
