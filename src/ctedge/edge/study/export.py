"""A study's lung slices as 8-bit PNGs, to train a slice model on studies."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ctedge.core.dicom import DicomError
from ctedge.core.errors import CtedgeError
from ctedge.core.imageio import DEFAULT_WINDOW, hu_to_gray
from ctedge.edge.study.hu import LUNG_MIN_FRACTION, lung_fraction, slice_hu
from ctedge.edge.study.records import Study
from ctedge.edge.study.select import order_slices, select_series


def export_slices(study: Study, folder: str | Path, prefix: str, window: tuple[float, float] = DEFAULT_WINDOW,
                  keep=None) -> list[Path]:
    """Write the lung slices of a study's chosen series as 8-bit PNGs: windowed like
    every ctedge input, uncompressed (so file size says nothing of the content), named
    PREFIX_sINDEX.png by their place in the ordered series. ``keep(index, total)``
    picks slices (e.g. those a reader marked); slices without lung (the criterion
    ``predict --study`` uses) are left out."""
    if study.error:
        raise CtedgeError(f"{study.input}: {study.error}")
    selection = select_series(study)
    if selection.series_uid is None:
        raise CtedgeError(f"{study.input}: no axial CT series ({'; '.join(r.reason for r in selection.rejected)})")
    ordered, _, _ = order_slices(study.series[selection.series_uid])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for index, ref in enumerate(ordered):
            if keep is not None and not keep(index, len(ordered)):
                continue
            try:
                hu = slice_hu(ref)
            except DicomError as exc:
                raise CtedgeError(f"{ref.name}: {exc}") from None
            if lung_fraction(hu) >= LUNG_MIN_FRACTION:
                path = folder / f"{prefix}_s{index:03d}.png"
                cv2.imwrite(str(path), np.round(hu_to_gray(hu, window)).astype(np.uint8),
                            [cv2.IMWRITE_PNG_COMPRESSION, 0])
                written.append(path)
    finally:
        study.close()
    return written
