"""Stage 3, hu: a slice to Hounsfield units (through ``ctedge.core.dicom.dataset_hu``,
the one DICOM path), the lung criterion, and the model input of a lung slice."""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np

from ctedge.core.dicom import DEFAULT_MAX_PIXELS, DicomError, dataset_hu
from ctedge.core.imageio import hu_to_gray
from ctedge.core.preprocess import PREPROCESS_CONTRACT, to_model_input
from ctedge.edge.study.records import SliceRef

# Lung criterion (on the slice shrunk to at most 128 px)
BODY_HU = -500.0  # tissue; the body outline is the largest such region, holes filled
LUNG_HU = (-1000.0, -400.0)  # aerated lung inside the body outline
LUNG_MIN_FRACTION = 0.05  # of the body outline's area


def slice_hu(ref: SliceRef, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The slice's pixels in HU (float32); raises DicomError with the reason."""
    if ref.cols * ref.rows * ref.frames > max_pixels:  # from the header, before any pixel is read
        from ctedge.core.dicom import pixel_budget_message

        raise DicomError(pixel_budget_message(ref.cols, ref.rows * ref.frames, max_pixels))
    if ref.load is None:
        raise DicomError("no pixel data to read")
    try:
        loaded = ref.load()
    except DicomError:
        raise
    except PermissionError:
        raise DicomError("unreadable (permission denied)") from None
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise DicomError(f"cannot read the file ({exc.__class__.__name__}: {exc})") from None
    if isinstance(loaded, np.ndarray):  # a NIfTI slice, already in HU
        bad = int(np.count_nonzero(~np.isfinite(loaded)))
        if bad:
            raise DicomError(f"{bad} non-finite voxel value(s) (NaN or infinity)")
        return loaded
    hu = dataset_hu(loaded, max_pixels)
    if hu.shape != (ref.rows, ref.cols):
        raise DicomError(f"pixel array of shape {hu.shape}, not one {ref.rows}x{ref.cols} slice")
    return hu


def lung_fraction(hu: np.ndarray) -> float:
    """Share of the body outline that is aerated lung (HU in ``LUNG_HU``).

    Body outline: the largest connected region above ``BODY_HU`` with its holes
    filled (the lungs are such holes); the table and air outside don't count.
    """
    scale = 128 / max(hu.shape)
    small = cv2.resize(hu, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else hu
    tissue = (small > BODY_HU).astype(np.uint8)
    contours, _ = cv2.findContours(tissue, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return 0.0
    body = np.zeros_like(tissue)
    cv2.drawContours(body, [max(contours, key=cv2.contourArea)], -1, 1, -1)
    area = int(body.sum())
    if not area:
        return 0.0
    lung = (small >= LUNG_HU[0]) & (small <= LUNG_HU[1]) & (body > 0)
    return float(lung.sum()) / area


@dataclass
class SliceData:
    lung_fraction: float = 0.0
    image: np.ndarray | None = None  # model input, only for lung slices
    thumbnail: np.ndarray | None = None
    error: str | None = None
    seconds: float = 0.0


def decode_slice(ref: SliceRef, window: tuple[float, float], size: int, thumbnail: int = 0,
                 contract: int = PREPROCESS_CONTRACT, max_pixels: int = DEFAULT_MAX_PIXELS) -> SliceData:
    """Worker-thread job: decode, HU, lung criterion, model input (lung slices only)."""
    started = time.perf_counter()
    try:
        hu = slice_hu(ref, max_pixels)
    except DicomError as exc:
        return SliceData(error=f"{ref.name}: {exc}", seconds=time.perf_counter() - started)
    data = SliceData(lung_fraction=lung_fraction(hu))
    if data.lung_fraction >= LUNG_MIN_FRACTION:
        data.image = to_model_input(hu_to_gray(hu, window), size, contract)
        if thumbnail:
            data.thumbnail = data.image[:, :, 0].astype(np.uint8)
            data.thumbnail = cv2.resize(data.thumbnail, (thumbnail, thumbnail), interpolation=cv2.INTER_AREA)
    data.seconds = time.perf_counter() - started
    return data
