"""A patient's answer from a whole CT study: DICOM series (or NIfTI) in, one decision out.

Base install only (numpy, opencv, pydicom, onnxruntime through ``Classifier``);
nibabel and pydicom's compressed-pixel plugins are optional extras imported
when needed. The steps, each reported in the result:

1. **Read headers** of every file under a folder (recursive) or in a ``.zip``
   (``stop_before_pixels``; DICOMDIR and non-DICOM files skipped), group them by
   StudyInstanceUID, then SeriesInstanceUID.
2. **Pick the series** (like MONAI Deploy's series selector): Modality CT,
   ImageType ORIGINAL and PRIMARY (not LOCALIZER, DERIVED, SECONDARY), axial
   (slice normal within 25 degrees of the patient's z axis), at least
   ``MIN_SLICES`` slices; then the one with the most slices. ``series_uid``
   overrides. Every rejected series is listed with its reason.
3. **Order** the chosen series' slices by ImagePositionPatient . normal;
   duplicate positions, gaps (spacing over ``GAP_FACTOR`` x the median) and
   slices of another matrix size are reported (duplicates and odd sizes dropped).
4. **Sample** every ``step``-th slice along the series (default: as many as keep
   at most ``max_slices``); only those are decoded (pixels in HU from
   RescaleSlope/RescaleIntercept) in worker threads, overlapped with batched
   inference, and only those with lung in them (``lung_fraction``) are classified.
5. **Aggregate** the slice probabilities into the patient's (default: mean of the
   top ``k`` slices) and threshold it with the model's metadata threshold.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ctedge.core.choices import Aggregate
from ctedge.core.errors import CtedgeError, UnreadableImage
from ctedge.core.imageio import DEFAULT_WINDOW, check_pixels, hu_to_gray, max_pixels
from ctedge.core.preprocess import PREPROCESS_CONTRACT, to_model_input

# Series selection
MIN_SLICES = 3  # fewer is a scout, a key image or a dose screen, not a chest CT
AXIAL_MIN_COS = math.cos(math.radians(25))  # |normal . z| for an axial series
BAD_IMAGE_TYPES = ("LOCALIZER", "DERIVED", "SECONDARY")
GAP_FACTOR = 1.5  # a spacing over 1.5 x the median is reported as a gap
DUPLICATE_MM = 0.01
# Lung criterion (on the slice shrunk to at most 128 px)
BODY_HU = -500.0  # tissue; the body outline is the largest such region, holes filled
LUNG_HU = (-1000.0, -400.0)  # aerated lung inside the body outline
LUNG_MIN_FRACTION = 0.05  # of the body outline's area
# Work bounds and aggregation
DEFAULT_MAX_SLICES = 64
DEFAULT_TOP_K = 5
TARGET_RATIO = 1.1  # bench --study: pipeline wall / batched inference alone, at most this
AGGREGATES = Aggregate.values()

CODECS_EXTRA = 'pip install "ctedge[dicom-codecs]"'
NIFTI_EXTRA = 'pip install "ctedge[nifti]"'
NIFTI_SUFFIXES = (".nii", ".nii.gz")
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality", "ImageType",
               "SOPClassUID", "Rows", "Columns", "NumberOfFrames", "ImageOrientationPatient",
               "ImagePositionPatient", "RescaleSlope", "RescaleIntercept", "SeriesDescription"]
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class SliceRef:
    """One slice: where it is, and the header values the pipeline needs."""

    name: str  # file path, ZIP:member, or NIFTI#index; shown in messages
    study_uid: str = ""
    series_uid: str = ""
    patient_id: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = ()
    description: str = ""
    rows: int = 0
    cols: int = 0
    frames: int = 1
    orientation: tuple[float, ...] | None = None
    position: tuple[float, ...] | None = None
    slope: float | None = None
    intercept: float | None = None
    problem: str | None = None  # a header value that makes the slice unusable
    source: Any = field(default=None, repr=False)  # _Zip, _Nifti or None (a plain file)
    index: int = 0  # NIfTI slice index

    def open(self):
        """What pydicom.dcmread reads: the path or the zip member's bytes."""
        return self.source.read(self.name) if self.source is not None else self.name


@dataclass
class Study:
    """The files of one StudyInstanceUID found under one input path."""

    input: str
    study_uid: str
    patient_id: str = ""
    series: dict[str, list[SliceRef]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(kw_only=True)
class StudyOptions:
    series_uid: str | None = None
    slice_step: int | None = None  # None: as many as keep at most max_slices
    max_slices: int = DEFAULT_MAX_SLICES
    aggregate: str = "topk"
    top_k: int = DEFAULT_TOP_K
    batch_size: int = 8
    workers: int | None = None  # decode threads (default: the CPU count)
    keep_thumbnails: bool = False

    def check(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise CtedgeError(f"must be one of {', '.join(AGGREGATES)}, not {self.aggregate!r}", param="aggregate")
        for name in ("top_k", "max_slices", "batch_size"):
            if getattr(self, name) < 1:
                raise CtedgeError(f"must be at least 1, not {getattr(self, name)}", param=name)
        if self.slice_step is not None and self.slice_step < 1:
            raise CtedgeError(f"must be at least 1, not {self.slice_step}", param="slice_step")


@dataclass
class StudyResult:
    input: str
    study_uid: str = ""
    patient_id: str = ""
    series_uid: str = ""
    series_description: str = ""
    slices_total: int = 0
    slices_sampled: int = 0
    slices_without_lung: int = 0
    slices_used: int = 0
    slice_step: int = 0
    probability: float | None = None
    label: str | None = None
    aggregate: str = ""
    top_slices: list[dict] = field(default_factory=list)
    slices: list[dict] = field(default_factory=list)
    series_rejected: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    thumbnails: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("thumbnails")
        return data


# --- reading headers --------------------------------------------------------

class _Zip:
    """A zip archive shared by the worker threads (reads under a lock)."""

    def __init__(self, path: Path):
        self.archive = zipfile.ZipFile(path)
        self.lock = threading.Lock()
        self.prefix = f"{path}:"

    def read(self, name: str) -> io.BytesIO:
        with self.lock:
            return io.BytesIO(self.archive.read(name.removeprefix(self.prefix)))


def _text(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _floats(ds, keyword: str, count: int) -> tuple[float, ...] | None:
    """A multi-valued numeric tag as finite floats; None when absent; ValueError when bad."""
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    from pydicom.multival import MultiValue

    value = ds[keyword].value
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{keyword} is not numeric ({value!r})") from None
    if len(numbers) != count or not all(map(math.isfinite, numbers)):
        raise ValueError(f"{keyword} must be {count} finite numbers, not {value!r}")
    return numbers


def header(ds, name: str, source=None) -> SliceRef:
    """The header values of one DICOM dataset; bad values end up in ``problem``."""
    ref = SliceRef(name=name, source=source, study_uid=_text(ds, "StudyInstanceUID"),
                   series_uid=_text(ds, "SeriesInstanceUID"), patient_id=_text(ds, "PatientID"),
                   modality=_text(ds, "Modality").upper(), description=_text(ds, "SeriesDescription"))
    image_type = ds.get("ImageType", None)
    if image_type is not None:
        values = [image_type] if isinstance(image_type, str) else list(image_type)
        ref.image_type = tuple(str(v).strip().upper() for v in values)
    problems = []
    try:
        ref.rows, ref.cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        ref.frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        problems.append("Rows/Columns/NumberOfFrames are not integers")
    for keyword, count, attr in (("ImageOrientationPatient", 6, "orientation"),
                                 ("ImagePositionPatient", 3, "position")):
        try:
            setattr(ref, attr, _floats(ds, keyword, count))
        except ValueError as exc:
            problems.append(str(exc))
    for keyword, attr in (("RescaleSlope", "slope"), ("RescaleIntercept", "intercept")):
        try:
            value = _floats(ds, keyword, 1)
            setattr(ref, attr, None if value is None else value[0])
        except ValueError as exc:
            problems.append(str(exc))
    if ref.slope == 0:
        problems.append("RescaleSlope is 0")
    ref.problem = "; ".join(problems) or None
    return ref


def _read_header(fp, name: str, source=None) -> SliceRef | None:
    """Header of one file; None when it is not DICOM (or is a DICOMDIR)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except (InvalidDicomError, EOFError):
        return None
    except Exception as exc:  # pydicom raises many types for a damaged header
        return SliceRef(name=name, source=source, problem=f"unreadable DICOM header ({exc})")
    sop = str(getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    if sop == DICOMDIR_SOP_CLASS:
        return None
    return header(ds, name, source)


def _looks_like_dicom(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR" or path.name.startswith("."):
        return False
    try:
        with open(path, "rb") as f:
            start = f.read(132)
    except OSError:
        return False
    return start[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def _group(input_name: str, refs: list[SliceRef], skipped: list[str]) -> list[Study]:
    """Slices -> studies -> series; files without UIDs become warnings."""
    studies: dict[str, Study] = {}
    orphans = []
    for ref in refs:
        if not ref.study_uid or not ref.series_uid:
            orphans.append(f"{ref.name}: {ref.problem or 'no StudyInstanceUID/SeriesInstanceUID'}; skipped")
            continue
        study = studies.setdefault(ref.study_uid, Study(input_name, ref.study_uid, ref.patient_id))
        study.series.setdefault(ref.series_uid, []).append(ref)
    if skipped:
        orphans.append(f"{len(skipped)} file(s) that are not DICOM skipped (e.g. {skipped[0]})")
    if not studies:
        reason = "no DICOM image files found"
        if orphans:
            reason += " (" + "; ".join(orphans[:3]) + ")"
        return [Study(input_name, "", error=reason)]
    for study in studies.values():
        study.warnings += orphans
    return list(studies.values())


def find_studies(path: str | Path) -> list[Study]:
    """Every study under one input: a folder (recursive), a .zip, or a NIfTI volume.

    Never raises for bad content: a study that can't be read comes back with ``error``.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        return [Study(name, "", error="no such file or folder")]
    if path.is_file() and name.lower().endswith(NIFTI_SUFFIXES):
        return [read_nifti(path)]
    refs: list[SliceRef] = []
    skipped: list[str] = []
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            archive = _Zip(path)
            members = [m for m in archive.archive.infolist() if not m.is_dir()]
            for member in members:
                member_name = f"{path}:{member.filename}"
                base = member.filename.rsplit("/", 1)[-1]
                if base.upper() == "DICOMDIR" or base.startswith("."):
                    continue
                ref = _read_header(archive.read(member_name), member_name, archive)
                (skipped.append(member_name) if ref is None else refs.append(ref))
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as exc:
            return [Study(name, "", error=f"unreadable zip archive ({exc})")]
    elif path.is_file() and path.suffix.lower() == ".zip":
        return [Study(name, "", error="unreadable zip archive (not a zip file or truncated)")]
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if file.name.lower().endswith(NIFTI_SUFFIXES):
                skipped.append(f"{file} (NIfTI: pass it as its own input)")
            elif not _looks_like_dicom(file):
                if file.name.upper() != "DICOMDIR" and not file.name.startswith("."):
                    skipped.append(str(file))
            else:
                ref = _read_header(str(file), str(file))
                (skipped.append(str(file)) if ref is None else refs.append(ref))
    else:
        ref = _read_header(str(path), name) if _looks_like_dicom(path) else None
        if ref is None:
            return [Study(name, "", error="not a DICOM file, zip archive, NIfTI volume or folder")]
        refs.append(ref)
    return _group(name, refs, skipped)


# --- NIfTI --------------------------------------------------------------------

class _Nifti:
    """A NIfTI volume in RAS+ order; voxel values are taken as HU."""

    def __init__(self, image):
        self.image = image
        self.data = None
        self.lock = threading.Lock()

    def slice(self, index: int) -> np.ndarray:
        with self.lock:
            if self.data is None:
                self.data = np.asarray(self.image.dataobj, dtype=np.float32)
        # RAS+ axis 0 runs to the patient's left->right... flipped so the image reads
        # like a radiological axial view: rows anterior->posterior, columns right->left
        return self.data[::-1, ::-1, index].T


def read_nifti(path: Path) -> Study:
    """A NIfTI volume as one study with one series (axis 2 after reorienting to RAS+)."""
    try:
        import nibabel
    except ImportError:
        return Study(str(path), path.name, error=f"reading NIfTI needs nibabel: {NIFTI_EXTRA}")
    try:
        image = nibabel.as_closest_canonical(nibabel.load(str(path)))
        shape = image.shape
    except Exception as exc:  # nibabel raises many types for a bad file
        return Study(str(path), path.name, error=f"not a readable NIfTI volume ({exc})")
    if len(shape) != 3:
        return Study(str(path), path.name, error=f"expected a 3-D volume, got shape {tuple(shape)}")
    try:  # the budget each DICOM slice keeps to, before any voxel is read
        check_pixels(path, shape[0], shape[1], max_pixels())
    except UnreadableImage as exc:
        return Study(str(path), path.name, error=exc.reason)
    source = _Nifti(image)
    z = image.affine @ np.array([[0, 0, k, 1] for k in range(shape[2])], float).T
    refs = [SliceRef(name=f"{path}#{k}", study_uid=path.name, series_uid=path.name, modality="CT",
                     image_type=("ORIGINAL", "PRIMARY", "AXIAL"), rows=shape[1], cols=shape[0],
                     orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), position=(0.0, 0.0, float(z[2, k])),
                     slope=1.0, intercept=0.0, source=source, index=k) for k in range(shape[2])]
    return Study(str(path), path.name, series={path.name: refs},
                 warnings=["NIfTI: voxel values taken as HU (scl_slope/scl_inter applied)"])


# --- choosing and ordering the series -------------------------------------------

def normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    length = np.linalg.norm(n)
    return n / length if length > 0 else n


def series_problem(refs: list[SliceRef]) -> str | None:
    """Why a series is not the axial CT to classify; None when it qualifies."""
    first = refs[0]
    if first.modality != "CT":
        return f"modality {first.modality or 'missing'}, not CT"
    bad = [t for t in first.image_type if t in BAD_IMAGE_TYPES]
    if bad:
        return f"ImageType {'/'.join(first.image_type)} ({bad[0]})"
    if first.image_type and not {"ORIGINAL", "PRIMARY"} <= set(first.image_type[:2]):
        return f"ImageType {'/'.join(first.image_type)} is not ORIGINAL/PRIMARY"
    if not first.rows or not first.cols:
        return "no image (no Rows/Columns: not an image object)"
    if first.frames > 1:
        return f"multi-frame object ({first.frames} frames), not supported"
    usable = [r for r in refs if r.problem is None and r.orientation and r.position]
    if not usable:
        return "no slice with a usable ImageOrientationPatient/ImagePositionPatient"
    cos = abs(float(normal(usable[0].orientation)[2]))
    if cos < AXIAL_MIN_COS:
        return f"not axial (slice normal {math.degrees(math.acos(min(cos, 1.0))):.0f} degrees from z)"
    if len(usable) < MIN_SLICES:
        return f"{len(usable)} usable slice(s), fewer than {MIN_SLICES}"
    return None


def select_series(study: Study, series_uid: str | None = None) -> tuple[str | None, list[dict]]:
    """The series to classify and every rejected one with its reason."""
    rejected, candidates = [], []
    for uid, refs in study.series.items():
        if series_uid is not None and uid != series_uid:
            reason = "not the series asked for (--series)"
        else:
            reason = series_problem(refs)
        if reason is None:
            candidates.append((len(refs), uid))
        else:
            rejected.append({"series_uid": uid, "slices": len(refs), "description": refs[0].description,
                             "reason": reason})
    if not candidates:
        return None, rejected
    candidates.sort(key=lambda c: (-c[0], c[1]))
    for count, uid in candidates[1:]:
        rejected.append({"series_uid": uid, "slices": count, "description": study.series[uid][0].description,
                         "reason": f"fewer slices than the chosen series ({count} < {candidates[0][0]})"})
    return candidates[0][1], rejected


def order_slices(refs: list[SliceRef]) -> tuple[list[SliceRef], np.ndarray, list[str]]:
    """Usable slices sorted along the slice normal, their positions (mm) and warnings."""
    warnings = []
    usable = []
    for ref in refs:
        if ref.problem is not None:
            warnings.append(f"{ref.name}: {ref.problem}; slice skipped")
        elif ref.slope is None or ref.intercept is None:
            warnings.append(f"{ref.name}: no RescaleSlope/RescaleIntercept, so its values cannot be "
                            "converted to HU; slice skipped")
        elif ref.orientation is None or ref.position is None:
            warnings.append(f"{ref.name}: no ImageOrientationPatient/ImagePositionPatient; slice skipped")
        else:
            usable.append(ref)
    if not usable:
        return [], np.zeros(0), warnings
    sizes: dict[tuple[int, int], int] = {}
    for ref in usable:
        sizes[(ref.rows, ref.cols)] = sizes.get((ref.rows, ref.cols), 0) + 1
    size = max(sizes, key=sizes.get)
    for ref in usable:
        if (ref.rows, ref.cols) != size:
            warnings.append(f"{ref.name}: matrix {ref.rows}x{ref.cols}, not the series' "
                            f"{size[0]}x{size[1]}; slice skipped")
    usable = [r for r in usable if (r.rows, r.cols) == size]
    n = normal(usable[0].orientation)
    positions = np.array([float(np.dot(r.position, n)) for r in usable])
    order = np.argsort(positions, kind="stable")
    usable, positions = [usable[i] for i in order], positions[order]
    keep = np.ones(len(usable), bool)
    keep[1:] = np.diff(positions) > DUPLICATE_MM
    if not keep.all():
        dropped = [usable[i].name for i in np.flatnonzero(~keep)]
        warnings.append(f"{len(dropped)} slice(s) at a duplicate position skipped (e.g. {dropped[0]})")
        usable, positions = [r for r, k in zip(usable, keep) if k], positions[keep]
    if len(positions) > 2:
        spacing = np.diff(positions)
        median = float(np.median(spacing))
        for i in np.flatnonzero(spacing > GAP_FACTOR * median):
            warnings.append(f"gap of {spacing[i]:.1f} mm (median spacing {median:.1f} mm) between "
                            f"{positions[i]:.1f} and {positions[i + 1]:.1f} mm")
    return usable, positions, warnings


def sample_indices(total: int, step: int | None, max_slices: int) -> tuple[list[int], int]:
    """Every ``step``-th index, centred in the series; step defaults to the smallest
    that keeps at most ``max_slices``."""
    if step is None:
        step = max(1, math.ceil(total / max_slices))
    start = ((total - 1) % step) // 2
    return list(range(start, total, step)), step


# --- pixels -------------------------------------------------------------------

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


def _decoder_available(uid) -> tuple[bool, str]:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return False, ""
    return decoder.is_available, ", ".join(decoder.missing_dependencies)


def codec_problem(ref: SliceRef) -> str | None:
    """A message naming the transfer syntax and the extra when no installed
    plugin can decode this slice's pixel data; None when one can."""
    if ref.source is not None and isinstance(ref.source, _Nifti):
        return None
    import pydicom

    try:
        meta = pydicom.dcmread(ref.open(), stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        uid = meta.TransferSyntaxUID
    except Exception:
        return None  # the decode itself will report what is wrong
    if not uid.is_compressed:
        return None
    available, missing = _decoder_available(uid)
    if available:
        return None
    return (f"pixel data is compressed as {uid.name} ({uid}) and no installed pydicom plugin can "
            f"decode it: {CODECS_EXTRA}" + (f" (plugins that can: {missing})" if missing else ""))


@dataclass
class SliceData:
    lung_fraction: float = 0.0
    image: np.ndarray | None = None  # model input, only for lung slices
    thumbnail: np.ndarray | None = None
    error: str | None = None
    seconds: float = 0.0


def hu_pixels(ref: SliceRef) -> np.ndarray:
    """The slice's pixels in HU (float32); raises ValueError with the reason."""
    if isinstance(ref.source, _Nifti):
        return ref.source.slice(ref.index)
    import pydicom

    try:  # the header's size against the pixel budget, before any pixel is read
        check_pixels(Path(ref.name), ref.cols, ref.rows * ref.frames, max_pixels())
    except UnreadableImage as exc:
        raise ValueError(exc.reason) from None
    try:
        ds = pydicom.dcmread(ref.open())
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for truncated or odd pixel data
        raise ValueError(f"cannot decode pixel data ({exc.__class__.__name__}: {exc})") from None
    if pixels.shape != (ref.rows, ref.cols):
        raise ValueError(f"pixel array of shape {pixels.shape}, not one {ref.rows}x{ref.cols} slice")
    return pixels.astype(np.float32) * np.float32(ref.slope) + np.float32(ref.intercept)


def decode_slice(ref: SliceRef, window: tuple[float, float], size: int, thumbnail: int = 0,
                 contract: int = PREPROCESS_CONTRACT) -> SliceData:
    """Worker-thread job: decode, HU, lung criterion, model input (lung slices only)."""
    started = time.perf_counter()
    try:
        hu = hu_pixels(ref)
    except ValueError as exc:
        return SliceData(error=f"{ref.name}: {exc}", seconds=time.perf_counter() - started)
    data = SliceData(lung_fraction=lung_fraction(hu))
    if data.lung_fraction >= LUNG_MIN_FRACTION:
        gray = hu_to_gray(hu, window)
        data.image = to_model_input(gray, size, contract)
        if thumbnail:
            data.thumbnail = data.image[:, :, 0].astype(np.uint8)
            data.thumbnail = cv2.resize(data.thumbnail, (thumbnail, thumbnail), interpolation=cv2.INTER_AREA)
    data.seconds = time.perf_counter() - started
    return data


def export_slices(study: Study, folder: str | Path, prefix: str, window: tuple[float, float] = DEFAULT_WINDOW,
                  keep=None) -> list[Path]:
    """Write the lung slices of a study's chosen series as 8-bit PNGs, to train a
    slice model on studies: windowed like every ctedge input, uncompressed (so file
    size says nothing of the content), named PREFIX_sINDEX.png by their place in the
    ordered series. ``keep(index, total)`` picks slices (e.g. those a reader marked);
    slices without lung (the criterion ``predict --study`` uses) are left out."""
    if study.error:
        raise CtedgeError(f"{study.input}: {study.error}")
    chosen, rejected = select_series(study)
    if chosen is None:
        raise CtedgeError(f"{study.input}: no axial CT series ({'; '.join(r['reason'] for r in rejected)})")
    ordered, _, _ = order_slices(study.series[chosen])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, ref in enumerate(ordered):
        if keep is not None and not keep(index, len(ordered)):
            continue
        try:
            hu = hu_pixels(ref)
        except ValueError as exc:
            raise CtedgeError(f"{ref.name}: {exc}") from None
        if lung_fraction(hu) >= LUNG_MIN_FRACTION:
            path = folder / f"{prefix}_s{index:03d}.png"
            cv2.imwrite(str(path), np.round(hu_to_gray(hu, window)).astype(np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 0])
            written.append(path)
    return written


# --- aggregation --------------------------------------------------------------

def aggregate(probabilities: np.ndarray, method: str = "topk", k: int = DEFAULT_TOP_K) -> float:
    """Patient probability from slice probabilities.

    topk (default): mean of the ``k`` highest. COVID-19 findings cover only part
    of the lungs, so the mean of all slices dilutes a clear finding with healthy
    slices; the single max follows one noisy slice; a few top slices together are
    both sensitive and steadier. max and mean are the two ends.
    """
    p = np.asarray(probabilities, float)
    if method == "max":
        return float(p.max())
    if method == "mean":
        return float(p.mean())
    if method == "topk":
        return float(np.sort(p)[-min(k, len(p)):].mean())
    raise CtedgeError(f"must be one of {', '.join(AGGREGATES)}, not {method!r}", param="aggregate")


# --- the whole path -------------------------------------------------------------

def classify_study(clf, study: Study, options: StudyOptions | None = None) -> StudyResult:
    """One study -> one result row; problems become ``warnings`` or ``error``.

    ``clf`` is anything with ``predict_arrays``, ``label``, ``size`` and ``window``
    (``ctedge.edge.runtime.Classifier`` or another backend).
    """
    options = options or StudyOptions()
    started = time.perf_counter()
    result = StudyResult(input=study.input, study_uid=study.study_uid, patient_id=study.patient_id,
                         warnings=list(study.warnings), error=study.error)
    if study.error:
        return result
    chosen, result.series_rejected = select_series(study, options.series_uid)
    if chosen is None:
        asked = f"series {options.series_uid} " if options.series_uid else "no axial CT series "
        reasons = "; ".join(f"{r['series_uid']}: {r['reason']}" for r in result.series_rejected
                            if options.series_uid is None or r["series_uid"] == options.series_uid)
        result.error = (asked + ("is not usable" if options.series_uid else "found")
                        + (f" ({reasons})" if reasons else " (not in this study)"))
        return result
    refs = study.series[chosen]
    result.series_uid, result.series_description = chosen, refs[0].description
    ordered, positions, warnings = order_slices(refs)
    result.warnings += warnings
    result.slices_total = len(ordered)
    indices, result.slice_step = sample_indices(len(ordered), options.slice_step, options.max_slices)
    result.slices_sampled = len(indices)
    problem = codec_problem(ordered[0])
    result.timings_s["headers_selection"] = time.perf_counter() - started
    if problem:
        result.error = f"{ordered[0].name}: {problem}"
        return result
    probabilities, used = _run_pipeline(clf, ordered, indices, options, result)
    if result.error:
        return result
    started = time.perf_counter()
    if not used:
        result.error = (f"no slice with lung among the {len(indices)} sampled (criterion: at least "
                        f"{LUNG_MIN_FRACTION:.0%} of the body outline in {LUNG_HU[0]:.0f}..{LUNG_HU[1]:.0f} HU)")
        result.timings_s["aggregation"] = time.perf_counter() - started
        return result
    p = np.asarray(probabilities)
    result.slices_used = len(used)
    result.aggregate = (f"topk (mean of the top {min(options.top_k, len(p))})" if options.aggregate == "topk"
                        else options.aggregate)
    result.probability = aggregate(p, options.aggregate, options.top_k)
    result.label = clf.label(result.probability)
    result.slices = [{"index": i, "position_mm": round(float(positions[i]), 3), "probability": float(q)}
                     for i, q in zip(used, p)]
    top = np.argsort(-p, kind="stable")[:options.top_k]
    result.top_slices = [result.slices[j] for j in top]
    result.timings_s["aggregation"] = time.perf_counter() - started
    return result


def _run_pipeline(clf, ordered: list[SliceRef], indices: list[int], options: StudyOptions,
                  result: StudyResult) -> tuple[list[float], list[int]]:
    """Decode in worker threads while the main thread runs batched inference."""
    workers = options.workers or os.cpu_count() or 2
    prefetch = max(2 * options.batch_size, 2 * workers)
    thumbnail = 96 if options.keep_thumbnails else 0
    probabilities: list[float] = []
    used: list[int] = []
    batch: list[tuple[int, SliceData]] = []
    timing = {"decode_preprocess_cpu": 0.0, "decode_wait": 0.0, "inference": 0.0}
    failed: list[str] = []
    non_lung = 0

    def infer() -> None:
        started = time.perf_counter()
        out = clf.predict_arrays(np.stack([d.image for _, d in batch]))
        timing["inference"] += time.perf_counter() - started
        for (i, d), q in zip(batch, out):
            probabilities.append(float(q))
            used.append(i)
            if d.thumbnail is not None:
                result.thumbnails[i] = d.thumbnail
        batch.clear()

    started = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="ctedge-decode") as pool:
        todo = iter(indices)
        pending: deque = deque()

        def fill() -> None:
            while len(pending) < prefetch:
                i = next(todo, None)
                if i is None:
                    return
                pending.append((i, pool.submit(decode_slice, ordered[i], clf.window, clf.size, thumbnail,
                                               getattr(clf, "contract", PREPROCESS_CONTRACT))))

        fill()
        while pending:
            i, future = pending.popleft()
            fill()
            waited = time.perf_counter()
            data = future.result()
            timing["decode_wait"] += time.perf_counter() - waited
            timing["decode_preprocess_cpu"] += data.seconds
            if data.error:
                failed.append(data.error)
            elif data.image is None:
                non_lung += 1
            else:
                batch.append((i, data))
                if len(batch) == options.batch_size:
                    infer()
        if batch:
            infer()
    timing["pipeline_wall"] = time.perf_counter() - started
    result.timings_s.update(timing)
    if failed:
        result.warnings += [f"{msg}; slice skipped" for msg in failed[:5]]
        if len(failed) > 5:
            result.warnings.append(f"... and {len(failed) - 5} more slice(s) that could not be decoded")
    if failed and len(failed) == len(indices):
        result.error = f"none of the {len(indices)} sampled slices could be decoded ({failed[0]})"
    result.slices_without_lung = non_lung
    return probabilities, used


def predict_studies(clf, paths: list[str | Path], options: StudyOptions | None = None,
                    progress=None) -> list[StudyResult]:
    """Every study under every path, one result each (errors as rows, never raised)."""
    options = options or StudyOptions()
    options.check()
    results = []
    for path in paths:
        started = time.perf_counter()
        studies = find_studies(path)
        scan = time.perf_counter() - started
        for study in studies:
            result = classify_study(clf, study, options)
            result.timings_s["headers_selection"] = result.timings_s.get("headers_selection", 0.0) + scan / len(studies)
            results.append(result)
            if progress:
                progress(result)
    return results


CSV_FIELDS = ["input", "study_uid", "patient_id", "series_uid", "slices_total", "slices_sampled",
              "slices_used", "slice_step", "probability", "label", "aggregate", "warnings", "error"]


def csv_row(result: StudyResult) -> dict:
    """One CSV row per study (warnings joined with ' | ')."""
    row = {key: getattr(result, key) for key in CSV_FIELDS}
    row["warnings"] = " | ".join(result.warnings)
    return row


# --- benchmark ----------------------------------------------------------------------

STAGES = ("headers_selection", "decode_preprocess_cpu", "decode_wait", "inference", "aggregation")


def bench_study(model: str | Path, folder: str | Path, options: StudyOptions | None = None,
                provider: str = "cpu", threads: int | None = None, runs: int = 3,
                process: bool = True, runtime: str = "auto", precision: str | None = None) -> dict:
    """Time one study end to end, ``runs`` times, split into stages.

    Stages overlap (decoding runs in threads during inference), so their busy
    times add up to more than the wall time; ``decode_wait`` is the time the
    inference loop sat waiting for a decoded slice (reading *not* hidden).
    The target ratio compares the pipeline's wall time with slices used x the
    per-slice time of batched inference alone (1.0: reading fully hidden).
    """
    import subprocess
    import sys

    from ctedge.edge.bench import machine_info, stats_ms, time_calls
    from ctedge.edge.runtime import Classifier

    options = options or StudyOptions()
    options.check()
    started = time.perf_counter()
    clf = Classifier(model, provider, threads, runtime=runtime, precision=precision)
    session_s = time.perf_counter() - started
    x = np.random.default_rng(0).uniform(0, 255, (options.batch_size, clf.size, clf.size, 3)).astype(np.float32)
    batch_ms = stats_ms(time_calls(lambda: clf.predict_arrays(x), 1, 5, None))
    per_slice_s = batch_ms["p50"] / 1000 / options.batch_size
    rows = []
    for _ in range(runs):
        started = time.perf_counter()
        results = predict_studies(clf, [folder], options)
        wall = time.perf_counter() - started
        ok = [r for r in results if not r.error]
        if not ok:
            raise CtedgeError(f"{folder}: no study could be classified ({results[0].error})")
        r = ok[0]
        row = {stage: r.timings_s.get(stage, 0.0) for stage in STAGES}
        row.update(wall_s=wall, pipeline_wall_s=r.timings_s["pipeline_wall"], slices_total=r.slices_total,
                   slices_sampled=r.slices_sampled, slices_used=r.slices_used, slice_step=r.slice_step,
                   slices_per_s=r.slices_used / wall, probability=r.probability,
                   target_ratio=r.timings_s["pipeline_wall"] / (r.slices_used * per_slice_s))
        rows.append(row)
    median = {key: float(np.median([row[key] for row in rows])) for key in rows[0] if key != "probability"}
    report = {"machine": machine_info(threads), "model": str(model), "provider": clf.providers[0],
              "runtime": clf.runtime, "precision": clf.precision,
              "input_size": clf.size, "study": str(folder), "options": asdict(options),
              "session_s": session_s, "batch_inference_ms": batch_ms, "per_slice_inference_s": per_slice_s,
              "runs": rows, "median": median}
    if process:
        command = [sys.executable, "-m", "ctedge.cli", "predict", str(model), str(folder), "--study",
                   "--max-slices", str(options.max_slices), "--aggregate", options.aggregate]
        if options.slice_step:
            command += ["--slice-step", str(options.slice_step)]
        if threads:
            command += ["--threads", str(threads)]
        command += ["--provider", provider, "--runtime", clf.runtime, "--precision", clf.precision]
        walls = []
        for _ in range(runs):
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            walls.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise CtedgeError(f"`{' '.join(command)}` failed: {done.stderr[-500:]}")
        report["process_wall_s"] = {"runs": walls, "median": float(np.median(walls)),
                                    "command": " ".join(["ctedge"] + command[3:])}
    return report
