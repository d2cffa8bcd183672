"""Input readers for predict: DICOM files written here with pydicom (MONOCHROME1/2, 8/16 bit, with and
without window tags, VOI LUT, rescale) against the documented pixel rule; PNG/JPEG through the training
rule; bad files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from _project import NIH_SHARED
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xraycls.data.images import MAX_IMAGE_PIXELS, ImageDecodeError, load_xray
from xraycls.inference.readers import collect_inputs, decode_dicom, is_dicom, read_image

DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rows_columns: tuple[int, int] | None = None,
    pixel_bytes: bytes | None = None,
    **tags: object,
) -> Path:
    """A DX DICOM file as a scanner would write it (preamble, DICM marker, explicit VR little endian).

    `pixels` None: no pixel data element at all. `rows_columns`/`pixel_bytes` override the header size and
    the stored bytes, to write damaged or oversized files. `tags` are set as given (WindowCenter, ...).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "TEST"
    if pixels is not None:
        colour = pixels.ndim == 3
        ds.Rows, ds.Columns = rows_columns or pixels.shape[:2]
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.PixelData = pixel_bytes if pixel_bytes is not None else pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.rint((values - values.min()) * 255.0 / (values.max() - values.min())).astype(np.uint8)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR), with the window's bottom at 0 and its top at 255."""
    fraction = (values.astype(np.float64) - (center - 0.5)) / (width - 1) + 0.5
    return np.rint(np.clip(fraction, 0.0, 1.0) * 255.0).astype(np.uint8)


def _pixels(bits: int, shape: tuple[int, int] = (24, 20)) -> np.ndarray:
    rng = np.random.default_rng(bits)
    if bits == 8:
        return rng.integers(10, 240, size=shape, dtype=np.uint8)
    return rng.integers(100, 4000, size=shape, dtype=np.uint16)  # 12-bit data in 16-bit words, as CR/DX


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_without_window_follows_the_training_depth_rule(
    tmp_path: Path, bits: int, photometric: str
) -> None:
    pixels = _pixels(bits)
    bits_stored = 8 if bits == 8 else 12
    path = write_dicom(tmp_path / "x.dcm", pixels, photometric=photometric, bits_stored=bits_stored)
    # 8-bit as stored (as an 8-bit PNG); deeper data from the image's own min..max.
    expected = pixels if bits == 8 else _minmax(pixels)
    if photometric == "MONOCHROME1":  # low values bright: inverted so that bone is white
        expected = 255 - expected
    np.testing.assert_array_equal(decode_dicom(path.read_bytes(), name="x.dcm"), expected)


@pytest.mark.parametrize(
    ("bits", "center", "width"), [(8, 120.0, 90.0), (16, 2000.0, 1500.0), (16, 1200.0, 1801.0)]
)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_tags_set_black_and_white(
    tmp_path: Path, bits: int, center: float, width: float, photometric: str
) -> None:
    pixels = _pixels(bits)
    path = write_dicom(
        tmp_path / "w.dcm",
        pixels,
        photometric=photometric,
        bits_stored=8 if bits == 8 else 12,
        WindowCenter=center,
        WindowWidth=width,
    )
    expected = _linear_window(pixels, center, width)
    assert expected.min() == 0 and expected.max() == 255  # the window really clips on both sides
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    np.testing.assert_array_equal(decode_dicom(path.read_bytes(), name="w.dcm"), expected)


def test_dicom_window_applies_after_the_rescale(tmp_path: Path) -> None:
    stored = _pixels(16)
    path = write_dicom(
        tmp_path / "ct.dcm",
        stored,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=1500,
        WindowWidth=3000,
    )
    expected = _linear_window(stored.astype(np.float64) * 2 - 1024, 1500, 3000)
    np.testing.assert_array_equal(decode_dicom(path.read_bytes(), name="ct.dcm"), expected)


def test_dicom_voi_lut_sequence_wins_over_window_tags(tmp_path: Path) -> None:
    stored = np.arange(40, dtype=np.uint16).reshape(5, 8) * 100  # 0..3900
    # A 4096-entry LUT: a square-root curve from 200 to 3000 (12-bit output).
    lut = np.rint(200 + 2800 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = lut.tobytes()  # OW, as most writers store it
    path = write_dicom(
        tmp_path / "lut.dcm",
        stored,
        bits_stored=12,
        VOILUTSequence=Sequence([item]),
        WindowCenter=100,  # would make nearly everything white if it were used
        WindowWidth=10,
    )
    expected = np.rint((lut[stored].astype(np.float64) - 200) * 255 / 2800).astype(np.uint8)
    np.testing.assert_array_equal(decode_dicom(path.read_bytes(), name="lut.dcm"), expected)


def test_signed_dicom_uses_its_own_range(tmp_path: Path) -> None:
    pixels = np.arange(-600, 600, 5, dtype=np.int16).reshape(12, 20)
    path = write_dicom(tmp_path / "signed.dcm", pixels)
    np.testing.assert_array_equal(decode_dicom(path.read_bytes(), name="s"), _minmax(pixels))


def test_rgb_dicom_goes_to_gray_by_bt601_luma(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gray = decode_dicom(path.read_bytes(), name="rgb.dcm")
    assert np.abs(gray.astype(int) - np.rint(luma).astype(int)).max() <= 1  # OpenCV's fixed-point luma


def test_dicom_and_png_with_the_same_pixels_give_the_same_model_input(tmp_path: Path) -> None:
    pixels = _pixels(8, shape=(300, 260))
    png = tmp_path / "same.png"
    cv2.imwrite(str(png), pixels)
    dicom = write_dicom(tmp_path / "same", pixels)  # no extension: found by its DICM marker
    assert is_dicom(dicom) and not is_dicom(png)
    np.testing.assert_array_equal(read_image(dicom, 64), read_image(png, 64))
    np.testing.assert_array_equal(read_image(png, 64), load_xray(png, 64))


def test_raster_formats_go_through_the_training_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    deep = rng.integers(0, 4096, size=(40, 40), dtype=np.uint16)
    colour = rng.integers(0, 256, size=(50, 30, 4), dtype=np.uint8)
    files = {"deep.png": deep, "rgba.png": colour, "photo.jpg": colour[:, :, :3], "photo.jpeg": deep // 16}
    for name, array in files.items():
        assert cv2.imwrite(str(tmp_path / name), array.astype(np.uint8) if name == "photo.jpeg" else array)
        np.testing.assert_array_equal(read_image(tmp_path / name, 32), load_xray(tmp_path / name, 32))
    deep_read = read_image(tmp_path / "deep.png", 40)  # native size: no resampling
    assert (deep_read.min(), deep_read.max()) == (0, 255)  # 16-bit: its own range, not cut to a low byte


@pytest.mark.real_nih
def test_real_rgba_samples_read_as_their_gray_values() -> None:
    manifest = (NIH_SHARED / "sample_manifest.csv").read_text().splitlines()
    rgba = [line.split(",")[0] for line in manifest if ",RGBA," in line]
    assert len(rgba) == 3
    for name in rgba:
        path = NIH_SHARED / "sample" / name
        red = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, :, 2]  # OpenCV's BGRA: index 2 is red
        expected = cv2.resize(red, (256, 256), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(read_image(path, 256), expected)


def test_dicom_without_pixel_data_is_named(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "report.dcm", None)
    with pytest.raises(ImageDecodeError, match=r"report\.dcm: DICOM without pixel data"):
        read_image(path, 32)


def test_dicom_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    # The header claims side x side 16-bit pixels; the file holds 8 bytes: decoding would fail differently.
    path = write_dicom(tmp_path / "bomb.dcm", _pixels(16, (2, 2)), rows_columns=(side, side))
    with pytest.raises(ImageDecodeError, match=rf"bomb\.dcm: DICOM image of {side}x{side} pixels exceeds"):
        read_image(path, 32)


def test_truncated_dicom_pixel_data_is_named(tmp_path: Path) -> None:
    pixels = _pixels(16)
    path = write_dicom(tmp_path / "cut.dcm", pixels, pixel_bytes=pixels.tobytes()[:100])
    with pytest.raises(ImageDecodeError, match=r"cut\.dcm: cannot decode the DICOM pixel data .*less than"):
        read_image(path, 32)


def test_multiframe_dicom_is_refused(tmp_path: Path) -> None:
    pixels = _pixels(8)
    path = write_dicom(
        tmp_path / "cine.dcm", pixels, NumberOfFrames=2, pixel_bytes=np.stack([pixels, pixels]).tobytes()
    )
    with pytest.raises(ImageDecodeError, match=r"cine\.dcm: multi-frame DICOM \(2 frames\)"):
        read_image(path, 32)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty file"),
        (b"patient notes, not an image\n" * 20, "not a DICOM file"),
        (b"\x00" * 400, "not a DICOM file"),
    ],
)
def test_bad_files_named_dcm_are_named(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.dcm"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=rf"bad\.dcm: {problem}"):
        read_image(path, 32)


def test_collect_inputs_walks_folders_and_keeps_the_given_order(tmp_path: Path) -> None:
    study = tmp_path / "study"
    (study / "series").mkdir(parents=True)
    pixels = _pixels(8, (8, 8))
    cv2.imwrite(str(study / "b.PNG"), pixels)
    cv2.imwrite(str(study / "a.jpg"), pixels)
    write_dicom(study / "series" / "IM0001", pixels)  # no suffix, DICM marker
    (study / "notes.txt").write_text("not an image")
    (study / ".hidden.png").write_bytes(b"")
    single = tmp_path / "single.png"
    cv2.imwrite(str(single), pixels)
    missing = tmp_path / "missing.png"
    found = collect_inputs([single, study, missing, single])
    assert found == [single, study / "a.jpg", study / "b.PNG", study / "series" / "IM0001", missing]
