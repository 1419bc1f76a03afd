"""Read one image file (PNG/JPEG/BMP/TIFF, 8/16-bit, gray/RGB/RGBA, or DICOM).

Needs only numpy, opencv and pydicom, so the TensorFlow-free runtime uses it
too: training and inference decode files the same way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ctedge.core.dicom import (  # noqa: F401  (is_dicom, DICOM_SUFFIXES: part of this module's API)
    DEFAULT_MAX_PIXELS,
    DICOM_SUFFIXES,
    DicomError,
    dataset_hu,
    is_dicom,
    pixel_budget_message,
    regular_file_problem,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES
DEFAULT_WINDOW = (-1000.0, 400.0)  # the paper's HU window: how DICOM is decoded to gray 0-255
MIN_SIDE = 16  # pixels: the smallest crop in COVID-CT is 53x26; a 1x1 image holds no slice
MAX_ASPECT = 4.0  # long side / short side: a CT slice (or a crop of one) is never a strip


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


def hu_to_gray(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map Hounsfield units onto gray levels 0-255 over ``window``.

    The inverse of the model's in-graph map (``preprocess.gray_to_hu``), so a
    DICOM slice reaches the model as the same 0-255 image an 8-bit export of
    that window would be.
    """
    low, high = window
    gray = np.subtract(hu, np.float32(low), dtype=np.float32)  # in place from here: each new
    gray /= np.float32(high - low)  # 512x512 float array cost a page-faulted megabyte (1.8 -> 0.3 ms)
    np.clip(gray, 0.0, 1.0, out=gray)
    gray *= np.float32(255.0)
    return gray


def _read_dicom(path: Path, window: tuple[float, float], max_pixels: int) -> Decoded:
    """One DICOM file through the study path's own dataset-to-HU function."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:  # pixel data deferred: read from the file only when decoded, after the checks
        ds = pydicom.dcmread(path, defer_size=1 << 16)
    except PermissionError:
        raise _unreadable(path, "unreadable (permission denied)") from None
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise _unreadable(path, f"not a readable DICOM file ({exc})") from None
    try:
        hu = dataset_hu(ds, max_pixels)
    except DicomError as exc:
        raise _unreadable(path, str(exc)) from None
    return Decoded(gray=hu_to_gray(hu, window), colour=None, kind="dicom")


def _unreadable(path: Path, reason: str):
    from ctedge.core.errors import UnreadableImage

    return UnreadableImage(path, reason)


def _jpeg_header(data) -> tuple[int, int, int] | None:
    """(width, height, colour components) from the first SOF segment."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):  # no length field
            at += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 10 > len(data):
                return None
            height, width, components = struct.unpack_from(">HHB", data, at + 5)
            return width, height, components
        at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    return None


def _tiff_size(data) -> tuple[int, int] | None:
    """(width, height) from the first IFD (classic TIFF and BigTIFF)."""
    order = "<" if bytes(data[:2]) == b"II" else ">"
    big = struct.unpack_from(order + "H", data, 2)[0] == 43
    count_fmt, entry_size, offset_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    ifd = struct.unpack_from(order + offset_fmt, data, 8 if big else 4)[0]
    count = struct.unpack_from(order + count_fmt, data, ifd)[0]
    start = ifd + (8 if big else 2)
    found = {}
    for i in range(count):
        tag, kind = struct.unpack_from(order + "HH", data, start + i * entry_size)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT, LONG or LONG8
            fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if fmt is None:
                return None
            found[tag] = struct.unpack_from(order + fmt, data, start + i * entry_size + (12 if big else 8))[0]
    return (found[256], found[257]) if len(found) == 2 else None


def raster_size(data) -> tuple[int, int] | None:
    """(width, height) read from a PNG, JPEG, BMP or TIFF header without decoding
    the pixels; None when ``data`` is none of these or its header is cut short."""
    head = bytes(data[:4])
    try:
        if bytes(data[:8]) == b"\x89PNG\r\n\x1a\n" and bytes(data[12:16]) == b"IHDR":
            return struct.unpack_from(">II", data, 16)
        if head[:3] == b"\xff\xd8\xff":
            found = _jpeg_header(data)
            return found[:2] if found else None
        if head[:2] == b"BM":
            if struct.unpack_from("<I", data, 14)[0] == 12:  # OS/2 core header
                return struct.unpack_from("<HH", data, 18)
            width, height = struct.unpack_from("<ii", data, 18)
            return abs(width), abs(height)
        if head in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            return _tiff_size(data)
    except struct.error:  # header shorter than it says
        return None
    return None


def check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Refuse an image above the pixel budget before its pixels are decoded."""
    if width * height > max_pixels:
        raise _unreadable(path, pixel_budget_message(width, height, max_pixels))


def check_shape(path: Path, width: int, height: int) -> None:
    """Refuse, from the header, an image that cannot hold a CT slice: a side under
    ``MIN_SIDE`` pixels or a long side over ``MAX_ASPECT`` times the short one."""
    if min(width, height) < MIN_SIDE:
        raise _unreadable(path, f"{width}x{height} pixels: a side under {MIN_SIDE} px cannot hold a CT slice")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise _unreadable(path, f"{width}x{height} pixels: an aspect ratio over {MAX_ASPECT:g}:1 "
                                "cannot hold a CT slice")


def _check_header(path: Path, data: np.ndarray, max_pixels: int) -> None:
    """Size, shape and colour model from the header, before any pixel is decoded."""
    if data.size == 0:
        raise _unreadable(path, "file is empty")
    size = raster_size(data)
    if size is None:
        raise _unreadable(path, "not a readable image (corrupt, truncated or not an image)")
    check_pixels(path, *size, max_pixels)
    check_shape(path, *size)
    jpeg = _jpeg_header(data) if bytes(data[:3]) == b"\xff\xd8\xff" else None
    if jpeg and jpeg[2] == 4:
        raise _unreadable(path, "CMYK JPEG (print colours, not a scan): save it as grayscale or RGB")


def _to_gray(path: Path, image: np.ndarray | None) -> Decoded:
    """Decoded pixels -> gray 0-255 float32 (and 8-bit BGR for colour files). The
    decoded array must be passed straight from the decoder: it is dropped as soon
    as it is converted (a 50 MP 16-bit RGBA is 400 MB)."""
    if image is None or image.size == 0:
        raise _unreadable(path, "not a readable image (corrupt, truncated or not an image)")
    if image.dtype not in (np.uint8, np.uint16):
        raise _unreadable(path, f"unsupported pixel type {image.dtype} (8- or 16-bit expected)")
    scale = 1.0 if image.dtype == np.uint8 else 255.0 / 65535.0
    colour = None
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        colour = image if image.dtype == np.uint8 else cv2.convertScaleAbs(image, alpha=1 / 257)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    gray = image.astype(np.float32)
    del image
    if scale != 1.0:
        gray *= scale  # in place: a large image is not copied twice more
    return Decoded(gray=gray, colour=colour, kind=path.suffix.lower().lstrip(".") or "image")


def _read_raster(path: Path, max_pixels: int) -> Decoded:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise _unreadable(path, f"cannot read file ({exc.strerror})") from None
    _check_header(path, data, max_pixels)
    try:
        return _to_gray(path, cv2.imdecode(data, cv2.IMREAD_UNCHANGED))
    except cv2.error as exc:
        raise _unreadable(path, f"cannot decode the image ({exc.err or exc})") from None


def read_image(path: str | Path, window: tuple[float, float] = DEFAULT_WINDOW,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode ``path`` to gray levels 0-255; raises ``UnreadableImage`` naming it.

    An image of more than ``max_pixels`` (``ctedge --max-pixels``; default 50 MP) is
    refused from its header, before its pixels are decoded (a decompression bomb:
    a small PNG of 20000x20000 pixels would take gigabytes); so is a PNG/JPEG/BMP/TIFF
    that cannot hold a CT slice (``check_shape``) and a CMYK JPEG."""
    path = Path(path)
    if not path.exists():
        raise _unreadable(path, "no such file")
    problem = regular_file_problem(path)
    if problem:
        raise _unreadable(path, problem)
    if is_dicom(path):
        return _read_dicom(path, window, max_pixels)
    return _read_raster(path, max_pixels)
