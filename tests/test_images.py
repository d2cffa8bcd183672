"""The one decoding rule: real NIH samples (mode L and RGBA), 16-bit scaling, colour, resizing, bad files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from _project import NIH_SHARED
from PIL import Image

from xraycls.data.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_xray, load_xray


def _png_bytes(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


def _sample_manifest() -> pd.DataFrame:
    return pd.read_csv(NIH_SHARED / "sample_manifest.csv")


@pytest.mark.real_nih
def test_real_rgba_samples_give_exactly_their_red_channel() -> None:
    manifest = _sample_manifest()
    rgba = manifest[manifest["mode"] == "RGBA"]["Image Index"].tolist()
    assert len(rgba) == 3
    for name in rgba:
        path = NIH_SHARED / "sample" / name
        with Image.open(path) as image:
            assert image.mode == "RGBA"
            red = np.asarray(image)[:, :, 0]
        decoded = decode_xray(path.read_bytes(), name=name)
        assert decoded.dtype == np.uint8 and decoded.shape == (1024, 1024)
        np.testing.assert_array_equal(decoded, red)


@pytest.mark.real_nih
def test_real_gray_samples_equal_pil_decoding() -> None:
    manifest = _sample_manifest()
    gray = manifest[manifest["mode"] == "L"]["Image Index"].tolist()
    assert len(gray) == 97
    for name in gray:
        path = NIH_SHARED / "sample" / name
        with Image.open(path) as image:
            expected = np.asarray(image)
        np.testing.assert_array_equal(decode_xray(path.read_bytes(), name=name), expected)


@pytest.mark.real_nih
def test_load_xray_shrinks_a_real_sample_with_area_interpolation() -> None:
    path = NIH_SHARED / "sample" / "00000001_000.png"
    small = load_xray(path, 256)
    assert small.shape == (256, 256) and small.dtype == np.uint8
    # INTER_AREA at an integer factor is the mean of each 4x4 block.
    full = np.asarray(Image.open(path), dtype=np.float64)
    block_mean = full.reshape(256, 4, 256, 4).mean(axis=(1, 3))
    assert np.abs(small - block_mean).max() <= 1.0


def test_sixteen_bit_is_scaled_by_the_images_own_range() -> None:
    # 12-bit data stored in 16 bits: a fixed >> 8 would map it to 0..15.
    rng = np.random.default_rng(0)
    image = rng.integers(100, 4001, size=(40, 30), dtype=np.uint16)
    image[0, 0], image[0, 1] = 100, 4000
    decoded = decode_xray(_png_bytes(image), name="deep.png")
    expected = np.rint((image.astype(np.float64) - 100) * 255.0 / 3900).astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.min() == 0 and decoded.max() == 255


def test_constant_sixteen_bit_image_becomes_zeros() -> None:
    decoded = decode_xray(_png_bytes(np.full((8, 8), 1234, dtype=np.uint16)), name="flat.png")
    np.testing.assert_array_equal(decoded, np.zeros((8, 8), dtype=np.uint8))


def test_colour_uses_bt601_luma_and_ignores_alpha() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, size=(16, 20, 1), dtype=np.uint8)
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")
    data = _pil_png_bytes(rgba)
    decoded = decode_xray(data, name="colour.png")
    luma = 0.299 * rgb[:, :, 0] + 0.587 * rgb[:, :, 1] + 0.114 * rgb[:, :, 2]
    # OpenCV's fixed-point conversion may differ from the rounded float formula by one grey level.
    assert np.abs(decoded.astype(np.float64) - luma).max() <= 1.0
    # Alpha has no effect: the same colours with alpha 255 decode identically.
    opaque = Image.fromarray(np.concatenate([rgb, np.full_like(alpha, 255)], axis=2), "RGBA")
    np.testing.assert_array_equal(decode_xray(_pil_png_bytes(opaque), name="opaque.png"), decoded)


def _pil_png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_gray_with_alpha_and_palette_images_decode_to_their_gray_values() -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    la = Image.fromarray(np.stack([gray, np.full_like(gray, 7)], axis=2), "LA")
    np.testing.assert_array_equal(decode_xray(_pil_png_bytes(la), name="la.png"), gray)
    palette = Image.fromarray(gray).convert("P")
    np.testing.assert_array_equal(decode_xray(_pil_png_bytes(palette), name="p.png"), gray)


def test_load_xray_squashes_any_shape_to_the_square_size(tmp_path: Path) -> None:
    wide = np.zeros((40, 80), dtype=np.uint8)
    wide[:, 40:] = 200  # right half bright
    path = tmp_path / "wide.png"
    path.write_bytes(_png_bytes(wide))
    out = load_xray(path, 20)
    assert out.shape == (20, 20) and out.dtype == np.uint8
    assert (out[:, :10] == 0).all() and (out[:, 10:] == 200).all()
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(_png_bytes(np.full((4, 4), 90, dtype=np.uint8)))
    enlarged = load_xray(tiny, 16)
    assert enlarged.shape == (16, 16) and (enlarged == 90).all()


def test_truncated_png_is_rejected_naming_the_file(tmp_path: Path) -> None:
    data = _png_bytes(np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8))
    path = tmp_path / "cut.png"
    for cut in (len(data) - 12, len(data) // 2, 30):
        path.write_bytes(data[:cut])
        with pytest.raises(ImageDecodeError, match="cut.png") as info:
            load_xray(path, 32)
        assert "truncated" in info.value.problem


def test_corrupt_png_data_is_rejected() -> None:
    data = bytearray(_png_bytes(np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)))
    data[len(data) // 2] ^= 0xFF  # inside the compressed pixel data
    with pytest.raises(ImageDecodeError, match=r"flipped.png: corrupt PNG"):
        decode_xray(bytes(data), name="flipped.png")


def test_empty_and_text_files_are_rejected_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty.png: empty file"):
        load_xray(empty, 32)
    text = tmp_path / "notes.png"
    text.write_text("Image Index,Finding Labels\n00000001_000.png,Hernia\n")
    with pytest.raises(ImageDecodeError, match=r"notes.png: not an image"):
        load_xray(text, 32)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    # A valid PNG header declaring 100000 x 100000 pixels (10 GB), with one tiny IDAT and IEND.
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + _chunk(b"IEND", b"")
    )
    assert MAX_IMAGE_PIXELS < 100_000 * 100_000
    with pytest.raises(ImageDecodeError, match=r"bomb.png: image of 100000x100000 pixels exceeds"):
        decode_xray(data, name="bomb.png")


def test_load_xray_rejects_a_bad_size(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes(np.zeros((4, 4), dtype=np.uint8)))
    with pytest.raises(ValueError, match="size must be a positive"):
        load_xray(path, 0)
