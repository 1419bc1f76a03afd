"""The answer as a Secondary Capture image (`--secondary-capture`), for viewers that show
no SR: slice probability along the scan axis, the threshold and the patient's answer.

Drawn with OpenCV (no plotting stack on the edge box), 8-bit grayscale. Patient and
study attributes are copied from the received instances like the SR's; type-2 ones a
study lacks, and PatientOrientation (a plot has none), are left empty, never invented.
No patient data is burned into the pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from ctedge.core.results import StudyResult
from ctedge.edge.serve.sr import Algorithm, copy_type2, derived_uid

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 50, 50  # plot margins in pixels
FONT = cv2.FONT_HERSHEY_SIMPLEX


def plot(result: StudyResult, threshold: float) -> np.ndarray:
    """The slice probabilities against position (mm), the threshold dashed, the answer on top."""
    image = np.full((HEIGHT, WIDTH), 255, np.uint8)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    positions = np.array([s.position_mm for s in result.slices], float)
    low, high = (positions.min(), positions.max()) if len(positions) else (0.0, 1.0)
    span = high - low or 1.0

    def point(position: float, probability: float) -> tuple[int, int]:
        return (round(x0 + (position - low) / span * (x1 - x0)), round(y0 - probability * (y0 - y1)))

    cv2.rectangle(image, (x0, y1), (x1, y0), 0, 1)
    for x in range(x0, x1, 12):  # the threshold, dashed
        cv2.line(image, (x, point(low, threshold)[1]), (min(x + 6, x1), point(low, threshold)[1]), 128, 1)
    ordered = sorted(result.slices, key=lambda s: s.position_mm)
    points = np.array([point(s.position_mm, s.probability) for s in ordered], np.int32)
    if len(points):
        cv2.polylines(image, [points], False, 0, 2, cv2.LINE_AA)
        for p in points:
            cv2.circle(image, tuple(int(v) for v in p), 3, 0, -1, cv2.LINE_AA)
    cv2.putText(image, f"P(COVID-19) {result.probability:.3f}: {result.label} ({result.slices_used} slices, "
                f"threshold {threshold:g})", (x0, 30), FONT, 0.5, 0, 1, cv2.LINE_AA)
    for value in (0.0, 0.5, 1.0):
        cv2.putText(image, f"{value:.1f}", (12, point(low, value)[1] + 4), FONT, 0.4, 0, 1, cv2.LINE_AA)
    cv2.putText(image, f"{low:.0f} mm", (x0, y0 + 20), FONT, 0.4, 0, 1, cv2.LINE_AA)
    cv2.putText(image, f"{high:.0f} mm", (x1 - 60, y0 + 20), FONT, 0.4, 0, 1, cv2.LINE_AA)
    cv2.putText(image, "slice probability along the scan axis", (x0 + 150, y0 + 38), FONT, 0.45, 0, 1,
                cv2.LINE_AA)
    return image


def build_capture(result: StudyResult, evidence: list, algorithm: Algorithm, version: int) -> Dataset:
    """The Secondary Capture dataset for one answered study; its UIDs derive from the study,
    the model and the answer's version, as the SR's do (a rebuilt one is the same)."""
    pixels = plot(result, algorithm.threshold)
    source = evidence[0]
    ds = Dataset()
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 100")
    ds.StudyInstanceUID = result.study_uid
    copy_type2(source, ds, result.study_uid, "the Secondary Capture")
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SeriesInstanceUID = derived_uid("sc-series", result.study_uid, algorithm, version)
    ds.SOPInstanceUID = derived_uid("sc", result.study_uid, algorithm, version)
    ds.Modality, ds.ConversionType, ds.Manufacturer = "OT", "WSD", "ctedge"
    ds.SeriesNumber, ds.InstanceNumber = 9902, version
    ds.SeriesDescription = f"ctedge COVID-19 plot v{version} ({algorithm.name} {algorithm.version})"
    ds.PatientOrientation = ds.Laterality = None  # a plot has neither (type 2/2C: present, empty)
    ds.BurnedInAnnotation = "NO"  # the text is the answer, no patient data
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
