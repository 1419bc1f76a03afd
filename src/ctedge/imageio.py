"""Read one image file (PNG/JPEG/BMP/TIFF, 8/16-bit, gray/RGB/RGBA, or DICOM).

Needs only numpy, opencv and pydicom, so the TensorFlow-free runtime uses it
too: training and inference decode files the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """Supported image files under ``folder`` (recursive, sorted, hidden ones skipped)."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SUPPORTED_SUFFIXES)


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for supported images."""
    found: list[Path] = []
    for path in map(Path, paths):
        found += image_files(path) if path.is_dir() else [path]
    return found


@dataclass
class Decoded:
    """A decoded file: gray levels 0-255 (float32, HxW) and, for colour
    files, the 8-bit BGR pixels (used to find annotation marks)."""

    gray: np.ndarray
    colour: np.ndarray | None
    kind: str


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the 'DICM' marker at byte 128."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def hu_to_gray(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map Hounsfield units onto gray levels 0-255 over ``window``.

    The inverse of the model's in-graph map (``preprocess.gray_to_hu``), so a
    DICOM slice reaches the model as the same 0-255 image an 8-bit export of
    that window would be.
    """
    low, high = window
    unit = np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    return unit * 255.0


def _read_dicom(path: Path, window: tuple[float, float]) -> Decoded:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise _unreadable(path, f"not a readable DICOM file ({exc})") from None
    if "PixelData" not in ds:
        raise _unreadable(path, "DICOM file has no pixel data")
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        raise _unreadable(
            path,
            "DICOM file has no RescaleSlope/RescaleIntercept, so its values "
            "cannot be converted to Hounsfield units",
        )
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad pixel data
        raise _unreadable(path, f"cannot decode DICOM pixel data ({exc})") from None
    if pixels.ndim != 2:
        raise _unreadable(path, f"expected one 2-D slice, got pixel array of shape {pixels.shape}")
    hu = pixels.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return Decoded(gray=hu_to_gray(hu, window), colour=None, kind="dicom")


def _unreadable(path: Path, reason: str):
    from .errors import UnreadableImage

    return UnreadableImage(path, reason)


def _read_raster(path: Path) -> Decoded:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise _unreadable(path, f"cannot read file ({exc.strerror})") from None
    if data.size == 0:
        raise _unreadable(path, "file is empty")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise _unreadable(path, "not a readable image (corrupt, truncated or not an image)")
    if image.dtype == np.uint8:
        scale = 1.0
    elif image.dtype == np.uint16:
        scale = 255.0 / 65535.0
    else:
        raise _unreadable(path, f"unsupported pixel type {image.dtype} (8- or 16-bit expected)")
    colour = None
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = image[:, :, :3]
        colour = image if image.dtype == np.uint8 else (image / 257).astype(np.uint8)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    gray = image.astype(np.float32) * scale
    return Decoded(gray=gray, colour=colour, kind=path.suffix.lower().lstrip(".") or "image")


def read_image(path: str | Path, window: tuple[float, float] = (-1000.0, 400.0)) -> Decoded:
    """Decode ``path`` to gray levels 0-255; raises ``UnreadableImage`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise _unreadable(path, "no such file")
    if is_dicom(path):
        return _read_dicom(path, window)
    return _read_raster(path)
