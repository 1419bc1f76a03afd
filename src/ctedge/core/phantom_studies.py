"""Phantom CT studies written as DICOM series (pydicom), for tests, benchmarks and
`ctedge demo --study`.

A study is an axial series through a body ellipse; lungs appear in the middle
70% of the slices (growing then shrinking), with neck/abdomen-like slices
without lung above and below. A positive patient has ground-glass-like
opacities (hazy patches about -350 HU) in some lung slices. Files are stored
uncompressed with fixed-length UIDs and names, so both classes have the same
file sizes (file size gives nothing away). Beside it, a scout (localizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
LUNG_EXTENT = (0.15, 0.85)  # part of the series with lung in it
OPACITY_EXTENT = (0.4, 0.75)  # part of the series with opacities (positive patients)


@dataclass(frozen=True)
class Anatomy:
    """One phantom patient's build and scan (fractions of the slice size); the defaults
    are the standard phantom, ``Anatomy.draw`` a patient unlike the others."""

    body: tuple[float, float] = (0.45, 0.35)  # half-axes of the body ellipse
    lungs: float = 1.0  # lung size
    lung_gap: float = 0.2  # each lung's centre from the midline
    shift: tuple[float, float] = (0.0, 0.0)  # the patient's offset on the table (x, y)
    tilt: float = 0.0  # degrees the patient lies rotated on the table
    noise: float = 25.0  # HU
    spacing: float = 2.5  # mm between slices (slice thickness)
    opacity_extent: tuple[float, float] = OPACITY_EXTENT  # part of the series with ground glass
    opacity: float = 500.0  # HU added by ground glass at its densest
    patches: tuple[int, int] = (3, 7)  # ground-glass patches per slice (range)
    jitter: float = 0.0  # how much outlines change from slice to slice (fraction; lung tilt 100x in degrees)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Anatomy":
        """A random patient: build, position, noise, slice spacing and extent and
        density of the opacities all vary, so patients are not copies of each other;
        body and lung outlines also change from slice to slice (as along a real
        series), so a model cannot tell the class by recognising a training patient."""
        start = rng.uniform(0.38, 0.42)
        return cls(body=(0.45 * rng.uniform(0.98, 1.02), 0.35 * rng.uniform(0.98, 1.02)),
                   lungs=rng.uniform(0.98, 1.02), lung_gap=0.2 * rng.uniform(0.98, 1.02),
                   shift=(rng.uniform(-0.015, 0.015), rng.uniform(-0.015, 0.015)), tilt=rng.uniform(-4, 4),
                   noise=rng.uniform(22, 30), spacing=float(rng.choice([1.25, 2.5, 3.0, 5.0])),
                   opacity_extent=(start, min(0.85, start + rng.uniform(0.3, 0.37))),
                   opacity=rng.uniform(450, 520), patches=(3, 7), jitter=0.1)


def fixed_uid(rng: np.random.Generator) -> str:
    """A valid UID of constant length (so file sizes don't vary between files)."""
    return "1.2.826.0.1.3680043.10.1." + str(10**19 + int(rng.integers(0, 10**18)))


def phantom_slice(rng: np.random.Generator, size: int, lung_scale: float, opacity: bool,
                  anatomy: Anatomy = Anatomy()) -> np.ndarray:
    """One HU slice of ``anatomy``: body ellipse, two lungs scaled by ``lung_scale`` (0:
    none), vessels, ground-glass-like patches when ``opacity``."""
    hu = np.full((size, size), -1000.0, np.float32)
    j = anatomy.jitter
    vary = (lambda s: rng.uniform(1 - s, 1 + s)) if j else (lambda s: 1.0)  # noqa: E731
    cx, cy = size / 2 * (1 + 2 * anatomy.shift[0]), size / 2 * (1 + 2 * anatomy.shift[1])
    cv2.ellipse(hu, (int(cx), int(cy)), (int(anatomy.body[0] * size * vary(j / 2)),
                                         int(anatomy.body[1] * size * vary(j / 2))), anatomy.tilt, 0, 360, 40.0, -1)
    across = np.array([np.cos(np.radians(anatomy.tilt)), np.sin(np.radians(anatomy.tilt))]) * anatomy.lung_gap * size
    lung_scale *= anatomy.lungs
    if lung_scale > 0.05:
        lungs = np.zeros((size, size), np.uint8)
        for side in (-1, 1):
            centre = (int(cx + side * across[0] * vary(j)), int(cy * vary(j / 2) + side * across[1]))
            axes = (max(1, int(0.14 * size * lung_scale * vary(j))), max(1, int(0.25 * size * lung_scale * vary(j))))
            tilt = anatomy.tilt + (rng.uniform(-100 * j, 100 * j) if j else 0.0)
            cv2.ellipse(lungs, centre, axes, tilt, 0, 360, 1, -1)
        hu[lungs > 0] = -850.0
        inside = np.argwhere(lungs)
        for _ in range(int(rng.integers(4, 9))):
            y, x = inside[rng.integers(len(inside))]
            cv2.circle(hu, (int(x), int(y)), max(1, size // 64), 30.0, -1)
        if opacity:
            patch = np.zeros((size, size), np.float32)
            for _ in range(int(rng.integers(*anatomy.patches))):
                y, x = inside[rng.integers(len(inside))]
                cv2.circle(patch, (int(x), int(y)), max(1, int(size * rng.uniform(0.06, 0.12))), 1.0, -1)
            patch = cv2.GaussianBlur(patch, (0, 0), size / 40) * (lungs > 0)
            hu += patch * anatomy.opacity
    hu += rng.normal(0, anatomy.noise, hu.shape).astype(np.float32)
    return hu


def opacity_slices(slices: int, extent: tuple[float, float] = OPACITY_EXTENT) -> np.ndarray:
    """Which slices of a positive phantom series (feet to head) have ground glass:
    the phantom's own annotation, as a reader would mark them."""
    t = np.linspace(0, 1, slices)
    return (t >= extent[0]) & (t <= extent[1])


def phantom_volume(rng: np.random.Generator, slices: int = 16, size: int = 64,
                   positive: bool = False, anatomy: Anatomy = Anatomy()) -> np.ndarray:
    """(slices, size, size) HU, feet-to-head order."""
    t = np.linspace(0, 1, slices)
    lo, hi = LUNG_EXTENT
    scale = np.where((t >= lo) & (t <= hi), np.sin(np.pi * np.clip((t - lo) / (hi - lo), 0, 1)) ** 0.5, 0.0)
    opacity = positive & opacity_slices(slices, anatomy.opacity_extent)
    return np.stack([phantom_slice(rng, size, float(s), bool(o), anatomy) for s, o in zip(scale, opacity)])


def write_slice(path: Path, stored: np.ndarray, tags: dict) -> Path:
    """One single-frame CT slice (16-bit unsigned, explicit VR little endian) with
    ``tags`` (keyword -> value; None leaves a tag out). The one slice writer of the
    phantoms, the benchmarks and the tests."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    tags = dict(tags)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = tags.pop("SOPClassUID", CTImageStorage)
    meta.MediaStorageSOPInstanceUID = tags.setdefault("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for keyword, value in tags.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: str | Path, hu: np.ndarray, rng: np.random.Generator, *, study_uid: str,
                 patient_id: str = "PHANTOM-0000", series_uid: str | None = None, spacing: float = 2.5,
                 orientation: tuple = AXIAL, image_type: tuple = ("ORIGINAL", "PRIMARY", "AXIAL"),
                 modality: str = "CT", description: str = "CHEST AXIAL", slope: float = 1.0,
                 intercept: float = -1024.0, tags: dict | None = None) -> list[Path]:
    """Write ``hu`` (slices, rows, cols) as one series with shuffled, extension-less names;
    ``tags`` adds or overrides attributes of every slice."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or fixed_uid(rng)
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    origin = -0.5 * hu.shape[2] * row - 0.5 * hu.shape[1] * col
    paths = []
    for k in rng.permutation(len(hu)):
        stored = np.clip(np.round((hu[k] - intercept) / slope), 0, 65535)
        position = origin + k * spacing * normal
        path = folder / f"IM{int(rng.integers(0, 16**8)):08X}"
        paths.append(write_slice(path, stored, {
            "SOPInstanceUID": fixed_uid(rng), "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
            "PatientID": patient_id, "Modality": modality, "ImageType": list(image_type),
            "SeriesDescription": description, "InstanceNumber": int(k) + 1,
            "ImageOrientationPatient": [float(v) for v in orientation],
            "ImagePositionPatient": [round(float(v), 3) for v in position],
            "PixelSpacing": [0.7, 0.7], "SliceThickness": spacing,
            "RescaleSlope": slope, "RescaleIntercept": intercept, **(tags or {})}))
    return paths


def write_scout(folder: str | Path, rng: np.random.Generator, study_uid: str, patient_id: str,
                size: int = 64) -> list[Path]:
    """A two-image coronal localizer series, as scanners put beside the axial one."""
    hu = np.stack([phantom_slice(rng, size, 1.0, False) for _ in range(2)])
    return write_series(folder, hu, rng, study_uid=study_uid, patient_id=patient_id, orientation=CORONAL,
                        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="SCOUT")


def write_study(folder: str | Path, rng: np.random.Generator, positive: bool, slices: int = 16,
                size: int = 64, patient_id: str = "PHANTOM-0000", scout: bool = True,
                anatomy: Anatomy = Anatomy()) -> str:
    """A phantom patient's study (axial series + scout) in ``folder``; returns its StudyInstanceUID."""
    study_uid = fixed_uid(rng)
    write_series(folder, phantom_volume(rng, slices, size, positive, anatomy), rng, study_uid=study_uid,
                 patient_id=patient_id, spacing=anatomy.spacing)
    if scout:
        write_scout(folder, rng, study_uid, patient_id, size)
    return study_uid
