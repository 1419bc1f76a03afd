"""One DICOM path: a pydicom dataset to Hounsfield units, for single images and
whole studies alike (rescale, padding value, photometric interpretation, codecs,
the pixel budget, non-finite values).

``dataset_hu`` raises ``DicomError`` (a ``ValueError``) whose text is the reason
only; callers add the file's name.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np

from ctedge.core.limits import DEFAULT_MAX_PIXELS, check_budgets  # noqa: F401  (part of this module's API)

DICOM_SUFFIXES = {".dcm", ".dicom"}
AIR_HU = -1000.0  # what a padding pixel (outside the scanned field of view) becomes
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
CODECS_EXTRA = 'pip install "ctedge[dicom-codecs]"'
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class DicomError(ValueError):
    """Why a dataset gives no HU slice (the reason only, without the file name)."""


def pixel_budget_message(width: int, height: int, max_pixels: int) -> str:
    return (f"{width}x{height} pixels ({width * height / 1e6:.3g} MP) is above the "
            f"{max_pixels / 1e6:g} MP limit (raise it with ctedge --max-pixels N)")


def regular_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file that can be read (never opens it);
    None when it is one. FIFOs, sockets and devices are never opened: a FIFO
    would block the reader forever."""
    try:
        mode = os.stat(path).st_mode
    except PermissionError:
        return "unreadable (permission denied)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "a folder"
    if not stat.S_ISREG(mode):
        kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
        return f"not a regular file ({kind}); skipped, never opened"
    if not os.access(path, os.R_OK):
        return "unreadable (permission denied)"
    return None


def is_dicom(path: Path) -> bool:
    """A regular file that is DICOM by suffix or by the 'DICM' marker at byte 128."""
    path = Path(path)
    if regular_file_problem(path) is not None:
        return path.suffix.lower() in DICOM_SUFFIXES
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def decoder_available(uid) -> tuple[bool, str]:
    """Whether an installed pydicom plugin decodes ``uid``; the missing ones otherwise."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return False, ""
    return decoder.is_available, ", ".join(decoder.missing_dependencies)


def codec_problem(ds) -> str | None:
    """Why no installed plugin can decode this dataset's pixel data (naming the
    transfer syntax and the extra); None when one can or the data is uncompressed."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None or not uid.is_compressed:
        return None
    available, missing = decoder_available(uid)
    if available:
        return None
    return (f"pixel data is compressed as {uid.name} ({uid}) and no installed pydicom plugin can "
            f"decode it: {CODECS_EXTRA}" + (f" (plugins that can: {missing})" if missing else ""))


def finite_number(ds, keyword: str) -> float | None:
    """A single numeric value as a float32-representable finite float; None when absent.
    ``ds``: a dataset or a mapping of keyword to value."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DicomError(f"{keyword} is not a number ({value!r})") from None
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise DicomError(f"{keyword} is {value!r}, not a finite number")
    return number


def _geometry(ds, max_pixels: int) -> tuple[int, int]:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        raise DicomError("no valid Rows/Columns") from None
    if rows < 1 or columns < 1:
        raise DicomError(f"Rows/Columns {rows}x{columns}: no image")
    if columns * rows * frames > max_pixels:
        raise DicomError(pixel_budget_message(columns, rows * frames, max_pixels))
    if frames > 1:
        raise DicomError(f"multi-frame object ({frames} frames), one 2-D slice expected")
    return rows, columns


def _colour_check(ds) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in MONOCHROME or samples != 1:
        raise DicomError(f"PhotometricInterpretation {photometric} with {samples} sample(s) per pixel: "
                         "a CT slice is monochrome (MONOCHROME1/2); refused, its values are not HU")


def _padding(ds, stored: np.ndarray) -> np.ndarray | None:
    """Pixels marked as padding (PixelPaddingValue, up to PixelPaddingRangeLimit)."""
    if "PixelPaddingValue" not in ds:
        return None
    low = ds.PixelPaddingValue
    high = ds.get("PixelPaddingRangeLimit", low)
    try:
        low, high = sorted((int(low), int(high)))
    except (TypeError, ValueError):
        return None
    mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def dataset_hu(ds, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One single-frame CT dataset as HU (float32, rows x columns).

    Integer pixel data needs RescaleSlope/RescaleIntercept (the modality LUT to HU;
    MONOCHROME1 only inverts the display, so its rescaled values are HU as well);
    Float Pixel Data are taken as HU, rescaled when a rescale is given. Padding
    pixels become air. Colour data (RGB, PALETTE COLOR, YBR) are refused, as are
    non-finite values: a NaN would give a label from garbage.
    """
    keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise DicomError("no pixel data (no PixelData, FloatPixelData or DoubleFloatPixelData)")
    rows, columns = _geometry(ds, max_pixels)
    _colour_check(ds)
    slope, intercept = finite_number(ds, "RescaleSlope"), finite_number(ds, "RescaleIntercept")
    if keyword == "PixelData" and (slope is None or intercept is None):
        raise DicomError("no RescaleSlope/RescaleIntercept, so its values cannot be converted to HU")
    if slope == 0:
        raise DicomError("RescaleSlope is 0")
    problem = codec_problem(ds)
    if problem:
        raise DicomError(problem)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for truncated or odd pixel data
        raise DicomError(f"cannot decode pixel data ({exc.__class__.__name__}: {exc})") from None
    if stored.shape != (rows, columns):
        raise DicomError(f"pixel array of shape {stored.shape}, not one {rows}x{columns} slice")
    hu = stored.astype(np.float32)
    if slope is not None and intercept is not None:
        hu *= np.float32(slope)
        hu += np.float32(intercept)
    padding = _padding(ds, stored) if keyword == "PixelData" else None
    if padding is not None:
        hu[padding] = AIR_HU
    bad = int(np.count_nonzero(~np.isfinite(hu)))
    if bad:
        raise DicomError(f"{bad} non-finite pixel value(s) (NaN or infinity) in HU")
    return hu
