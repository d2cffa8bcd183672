"""Read the files a user hands to `xraycls predict`: PNG/JPEG (any depth, RGBA) and DICOM, to 8-bit gray.

PNG, JPEG and other raster files go through the project's one decoding rule, `xraycls.data.images.load_xray`,
exactly as in training. DICOM files (the ``DICM`` marker at byte 128, or a ``.dcm``/``.dicom`` name) are read
with pydicom and turned into the same kind of array by this rule:

1. The pixel limit: ``Rows * Columns`` above `MAX_IMAGE_PIXELS` is refused from the header, before any pixel
   is decoded. Multi-frame files and files without pixel data are refused with the reason.
2. The modality transform (``Rescale Slope/Intercept`` or a Modality LUT; pydicom's `apply_modality_lut`).
3. The display window, where the file has one (pydicom's `apply_voi_lut`: the VOI LUT Sequence first, else
   ``Window Center/Width`` with the file's ``VOI LUT Function``): its output range is mapped linearly to
   0..255 (the window's bottom is black, its top white, values outside it are clipped).
   Without a window, the training rule's depth step applies (`xraycls.data.images.scale_to_uint8`): 8-bit
   data as stored, anything deeper (or rescaled) from the image's own min..max to 0..255.
4. ``MONOCHROME1`` (low values bright) is inverted (255 - value) so that bone is white, as in NIH's PNGs;
   RGB/YBR colour goes to gray by the same BT.601 luma as colour PNGs.
5. Then the same resize as every other image (`xraycls.data.images.resize_xray`).

Every problem is raised as `ImageDecodeError` naming the file and what is wrong.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from xraycls.data.images import (
    MAX_IMAGE_PIXELS,
    ImageDecodeError,
    load_xray,
    resize_xray,
    scale_to_uint8,
)

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "is_dicom",
    "decode_dicom",
    "read_image",
    "collect_inputs",
]

log = logging.getLogger(__name__)

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
# What a folder scan picks up by name (case-insensitive); files named otherwise are taken only when they
# carry the DICOM marker, since DICOM files from a scanner often have no extension at all.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_SUFFIXES)
_DICOM_MARKER_OFFSET = 128
_DICOM_MARKER = b"DICM"
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")  # pydicom returns these as RGB
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _has_dicom_marker(head: bytes) -> bool:
    return head[_DICOM_MARKER_OFFSET : _DICOM_MARKER_OFFSET + 4] == _DICOM_MARKER


def is_dicom(path: Path) -> bool:
    """True for a file with the DICOM marker at byte 128 or a ``.dcm``/``.dicom`` name."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return _has_dicom_marker(handle.read(_DICOM_MARKER_OFFSET + 4))
    except OSError:
        return False


def _parse_dicom(data: bytes, name: str):  # -> pydicom.Dataset
    import pydicom
    from pydicom.errors import InvalidDicomError

    if len(data) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    marked = _has_dicom_marker(data)
    try:
        with warnings.catch_warnings():
            # Without the marker (a bare data set, as some exporters write .dcm files) pydicom must be forced,
            # and forcing it over junk gives warnings and junk elements: judged below instead.
            warnings.simplefilter("ignore", UserWarning)
            ds = pydicom.dcmread(io.BytesIO(data), force=not marked)
    except InvalidDicomError as err:
        raise ImageDecodeError(name, f"not a DICOM file ({err})") from None
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for damaged files; name the file
        raise ImageDecodeError(name, f"unreadable DICOM ({type(err).__name__}: {err})") from None
    if not marked and not any(key in ds for key in ("SOPClassUID", "Rows", *_PIXEL_KEYWORDS)):
        raise ImageDecodeError(
            name, "not a DICOM file (no DICM marker at byte 128 and no DICOM image elements)"
        )
    return ds


def _check_header(ds, name: str) -> None:
    """Refuse what cannot or must not be decoded, from header fields only."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        kind = ds.get("SOPClassUID", None)
        what = f" (SOP class {kind.name})" if kind is not None and hasattr(kind, "name") else ""
        raise ImageDecodeError(name, f"DICOM without pixel data{what}")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(columns, int) or rows < 1 or columns < 1:
        raise ImageDecodeError(name, f"DICOM with invalid image size Rows={rows!r} Columns={columns!r}")
    if rows * columns > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            name,
            f"DICOM image of {columns}x{rows} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageDecodeError(name, f"multi-frame DICOM ({frames} frames); a radiograph has one")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in _MONOCHROME + _COLOUR:
        raise ImageDecodeError(
            name,
            f"DICOM photometric interpretation {photometric!r} is not supported (need MONOCHROME1/2 or RGB)",
        )


def _voi_output_range(ds) -> tuple[float, float]:
    """(lowest, highest) output of the file's VOI transform: its LUT's entries, or its window's y range."""
    from pydicom.pixels import apply_voi, apply_windowing

    if ds.get("VOILUTSequence"):
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries = int(descriptor[0]) or 2**16
        first = int(descriptor[1])
        values = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
        return float(values.min()), float(values.max())
    with np.errstate(over="ignore"):  # SIGMOID at +-inf: exp overflows to its exact limit
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
    return float(min(low, high)), float(max(low, high))


def _has_voi(ds) -> bool:
    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        return True
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _window_to_uint8(values: np.ndarray, ds, name: str) -> np.ndarray:
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence") and not np.issubdtype(values.dtype, np.integer):
        # A LUT is indexed by whole numbers; pydicom warns (and truncates) on float input.
        values = np.rint(values).astype(np.int64)
    windowed = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64)
    low, high = _voi_output_range(ds)
    if not np.isfinite(windowed).all():
        raise ImageDecodeError(name, "DICOM window gave NaN or infinite values")
    if high <= low:
        return np.zeros(windowed.shape, dtype=np.uint8)
    return np.rint(np.clip((windowed - low) * (255.0 / (high - low)), 0, 255)).astype(np.uint8)


def _dicom_pixels(ds, name: str) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)  # a short (cut-off) pixel buffer raises ValueError here
    except Exception as err:  # noqa: BLE001 - decoder plugins raise anything; name the file and the cause
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        where = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImageDecodeError(name, f"cannot decode the DICOM pixel data{where}: {message}") from None


def decode_dicom(data: bytes, *, name: str) -> np.ndarray:
    """DICOM file bytes -> [Rows, Columns] uint8 gray by the module's rule. `name` only labels errors."""
    from pydicom.pixels import apply_modality_lut

    ds = _parse_dicom(data, name)
    _check_header(ds, name)
    pixels = _dicom_pixels(ds, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in _COLOUR:
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ImageDecodeError(name, f"{photometric} DICOM with pixel array shape {list(pixels.shape)}")
        # pydicom hands colour back as RGB; the PNG rule's BT.601 luma, in RGB channel order.
        return scale_to_uint8(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), name)
    if pixels.ndim != 2:
        raise ImageDecodeError(name, f"{photometric} DICOM with pixel array shape {list(pixels.shape)}")
    try:
        values = apply_modality_lut(pixels, ds)
        gray = _window_to_uint8(values, ds, name) if _has_voi(ds) else scale_to_uint8(values, name)
    except ImageDecodeError:
        raise
    except (ValueError, NotImplementedError, AttributeError, IndexError, TypeError) as err:
        raise ImageDecodeError(name, f"unusable DICOM LUT or window: {err}") from None
    return 255 - gray if photometric == "MONOCHROME1" else gray


def read_image(path: Path, size: int) -> np.ndarray:
    """Any supported file -> [size, size] uint8 gray, as training saw its images (see the module doc).

    Raises `ImageDecodeError` for bad contents and `OSError` (e.g. FileNotFoundError) for an unreadable path.
    """
    path = Path(path)
    if not is_dicom(path):
        return load_xray(path, size)  # the training pipeline's own function, unchanged
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    return resize_xray(decode_dicom(path.read_bytes(), name=str(path)), size)


def _wanted(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)


def collect_inputs(paths: Iterable[Path]) -> list[Path]:
    """Files to predict, in a stable order: each file as given, each folder's images (recursively, sorted).

    A folder contributes files with an image suffix (`IMAGE_SUFFIXES`) or the DICOM marker; hidden files and
    anything else are left out (counted in a log line). A path that does not exist is kept, so the caller
    reports it as a failed input like any other bad file. A file named twice is kept once.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            chosen = [p for p in files if _wanted(p)]
            if len(chosen) < len(files):
                log.info("%s: left out %d non-image file(s)", path, len(files) - len(chosen))
            found.extend(chosen)
        else:
            found.append(path)
    return list(dict.fromkeys(found))
