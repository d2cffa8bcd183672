"""Decode an X-ray file to one 8-bit gray image: one rule for `prepare`, raw-PNG loading and predict.

The rule, applied by `decode_xray` (OpenCV reads the file as stored, `IMREAD_UNCHANGED`):

- 8-bit gray: kept as is.
- Colour (RGB, RGBA, gray+alpha, palette): converted to gray with ITU-R BT.601 luma
  (0.299 R + 0.587 G + 0.114 B, OpenCV's fixed-point `cvtColor`); alpha is ignored. Where R = G = B, as in
  the 3 RGBA files of the real NIH release (alpha 255), this gives exactly the R channel.
- 16-bit (or any deeper type): scaled linearly so that the image's own minimum maps to 0 and its maximum to
  255, rounded. NIH's 8-bit PNGs were windowed exports of the original DICOMs, so an image's own range is the
  closest match to what the model was trained on; a fixed `>> 8` would turn 12-bit data stored in 16 bits
  (values up to 4095) nearly black. A constant image becomes zeros.
- `load_xray` then resizes to `size` x `size` (squashing a non-square image, as the training pipeline's
  resize does): `cv2.INTER_AREA` when shrinking, bilinear when enlarging.

Bad input (empty, truncated, corrupt, not an image, more than `MAX_IMAGE_PIXELS` pixels) raises
`ImageDecodeError` naming the file and the problem. The pixel limit is checked from the file header, before
any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageDecodeError",
    "decode_xray",
    "load_xray",
    "resize_xray",
    "scale_to_uint8",
]

# The largest NIH original is 3827 x 4715 pixels; 12000 x 12000 leaves room for any real radiograph
# while refusing headers that would make the decoder allocate gigabytes.
MAX_IMAGE_PIXELS: int = 12000 * 12000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A complete PNG ends with the IEND chunk: zero length, type, and its fixed CRC.
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


class ImageDecodeError(ValueError):
    """An image file that cannot be turned into a gray uint8 array; `name` and `problem` say which and why."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def _png_header(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking that the file is complete (IEND at the end)."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageDecodeError(name, f"truncated or malformed PNG header ({len(data)} bytes)")
    width, height = struct.unpack(">II", data[16:24])
    if not data[-4096:].rstrip(b"\x00").endswith(_PNG_IEND):
        # Zero padding after IEND (from some copy tools) is tolerated; a missing IEND means a cut-off file.
        raise ImageDecodeError(name, "truncated PNG (no IEND chunk at the end of the file)")
    return width, height


def _other_header(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of a non-PNG image from its header only (PIL opens lazily, decoding no pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Our own limit applies below; PIL's warning for large images would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(name, f"image too large ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageDecodeError(name, "not an image file (unrecognised format)") from None


def _to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 1:
        return image[:, :, 0]
    if channels == 2:  # gray + alpha (OpenCV usually expands this to BGRA already)
        return image[:, :, 0]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return cv2.cvtColor(image[:, :, :4], cv2.COLOR_BGRA2GRAY)


def scale_to_uint8(gray: np.ndarray, name: str) -> np.ndarray:
    """The rule's depth step, [H, W] gray -> uint8: uint8 as is, any other type by its own min..max.

    Shared with the DICOM reader (`xraycls.inference.readers`): one rule for both. `name` labels errors.
    """
    if gray.dtype == np.uint8:
        return gray
    values = gray.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageDecodeError(name, f"{gray.dtype} image with NaN or infinite pixels")
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros(gray.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def decode_xray(data: bytes, *, name: str) -> np.ndarray:
    """Decode image file bytes by the module's rule -> [H, W] uint8 gray. `name` only labels errors."""
    if len(data) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    is_png = data.startswith(_PNG_SIGNATURE)
    width, height = _png_header(data, name) if is_png else _other_header(data, name)
    if width <= 0 or height <= 0:
        raise ImageDecodeError(name, f"invalid image size {width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            name, f"image of {width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels"
        )
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        raise ImageDecodeError(name, f"decoder error: {str(err).strip().splitlines()[-1]}") from None
    if image is None:
        kind = "PNG" if is_png else "image"
        raise ImageDecodeError(name, f"corrupt {kind} data (the decoder rejected it)")
    return scale_to_uint8(_to_gray(image), name)


def load_xray(path: Path, size: int) -> np.ndarray:
    """Read an image file and decode it by the module's rule -> [size, size] uint8 gray.

    Raises `ImageDecodeError` for bad contents, and `OSError` (e.g. `FileNotFoundError`) if unreadable.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    path = Path(path)
    return resize_xray(decode_xray(path.read_bytes(), name=str(path)), size)


def resize_xray(image: np.ndarray, size: int) -> np.ndarray:
    """The rule's resize step: [H, W] uint8 -> [size, size], INTER_AREA when shrinking, else bilinear."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    height, width = image.shape
    if (height, width) == (size, size):
        return image
    interpolation = cv2.INTER_AREA if size < max(height, width) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)
