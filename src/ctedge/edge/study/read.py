"""Stage 1, read: the only stage that takes paths. Folders (recursive), .zip
archives, NIfTI volumes, or pydicom datasets and bytes already in memory become
``Study`` objects: slices grouped by StudyInstanceUID, then SeriesInstanceUID.

Only regular files are opened (a FIFO would block forever; sockets and devices are
skipped with a reason); unreadable files and folders are named as such. Zip entries
and NIfTI volumes are held to a decompressed-size budget (``max_bytes``) checked
before anything is inflated.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ctedge.core.dicom import DICOM_SUFFIXES, DicomError, finite_number, is_dicom, regular_file_problem
from ctedge.core.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ctedge.edge.study.nifti import read_nifti
from ctedge.edge.study.records import SliceRef, Study

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# What a result (and a structured report) needs to reference its images and patient;
# empty when absent, never invented.
STUDY_ATTRIBUTES = ("AccessionNumber", "StudyDate", "StudyTime", "StudyID", "PatientName",
                    "PatientBirthDate", "PatientSex", "ReferringPhysicianName")
# What dataset_hu reads besides the pixel data itself (kept per slice, a few hundred bytes)
PIXEL_TAGS = ["SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames",
              "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration",
              "PixelPaddingValue", "PixelPaddingRangeLimit", "RescaleSlope", "RescaleIntercept"]
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "Modality",
               "ImageType", "SOPClassUID", "ImageOrientationPatient", "ImagePositionPatient",
               "SeriesDescription", "BodyPartExamined", "SliceThickness", *PIXEL_TAGS, *STUDY_ATTRIBUTES]


# --- header values ----------------------------------------------------------------

def _text(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _floats(ds, keyword: str, count: int) -> tuple[float, ...] | None:
    """A multi-valued numeric tag as finite floats; None when absent; DicomError when bad.
    ``ds``: a dataset or ``header_values``' mapping."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    import math

    from pydicom.multival import MultiValue

    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise DicomError(f"{keyword} is not numeric ({value!r})") from None
    if len(numbers) != count or not all(map(math.isfinite, numbers)):
        raise DicomError(f"{keyword} must be {count} finite numbers, not {value!r}")
    return numbers


def _orientation(ds) -> tuple[float, ...] | None:
    """ImageOrientationPatient: two unit vectors at right angles, or DicomError naming it."""
    values = _floats(ds, "ImageOrientationPatient", 6)
    if values is None:
        return None
    row, col = values[:3], values[3:]
    norms = [sum(v * v for v in vector) ** 0.5 for vector in (row, col)]
    dot = sum(a * b for a, b in zip(row, col))
    if min(norms) < 0.5 or abs(dot) > 0.1 * norms[0] * norms[1]:
        raise DicomError(f"ImageOrientationPatient {list(values)} is not two directions at right angles")
    return values


@functools.cache
def _tag(keyword: str):
    from pydicom.tag import Tag

    return Tag(keyword)


class HeaderValues:
    """A dataset's values by keyword (``get``, as a Dataset's), each element converted once,
    on first use, by pydicom's own conversion without a Dataset lookup per access (that
    lookup was a third of a 300-file header scan). Elements already converted, and
    ambiguous VRs (US or SS), go through the dataset; an element that does not convert
    reads as absent and is named in ``problems``."""

    def __init__(self, ds):
        self.ds, self.values, self.problems = ds, {}, []
        self.encoding = None  # the dataset's character set, found when a value needs it

    def get(self, keyword: str, default: Any = None) -> Any:
        if keyword not in self.values:
            self.values[keyword] = self._convert(keyword)
        value = self.values[keyword]
        return default if value is _ABSENT else value

    def _convert(self, keyword: str) -> Any:
        raw_type, convert, ambiguous, encodings = _pydicom_conversion()
        tag = _tag(keyword)
        elem = self.ds.get_item(tag)
        try:
            if isinstance(elem, raw_type):
                if self.encoding is None:  # as Dataset.__getitem__ finds it
                    self.encoding = self.ds.original_character_set or \
                        encodings(self.ds.get("SpecificCharacterSet") or "ISO_IR 6")
                elem = convert(elem, encoding=self.encoding, ds=self.ds)
                if elem.VR in ambiguous:
                    elem = self.ds[tag]
        except Exception as exc:  # pydicom raises many types for a malformed value
            self.problems.append(f"{keyword} unreadable ({exc.__class__.__name__}: {exc})")
            return _ABSENT
        return _ABSENT if elem is None else elem.value


_ABSENT = object()


@functools.cache
def _pydicom_conversion():
    """pydicom's raw element type, its conversion, the ambiguous VRs and its charset names,
    imported once (not per value)."""
    from pydicom.charset import convert_encodings
    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.valuerep import AMBIGUOUS_VR

    return RawDataElement, convert_raw_data_element, AMBIGUOUS_VR, convert_encodings


def header(ds, name: str, load: Callable[[], Any] | None = None) -> SliceRef:
    """The header values of one DICOM dataset; bad values end up in ``problem``. Values are
    read from ``tags`` (``HeaderValues``; a field read from files needs its keyword in HEADER_TAGS)."""
    tags = HeaderValues(ds)
    problems: list[str] = []
    ref = SliceRef(name=name, load=load, study_uid=_text(tags, "StudyInstanceUID"),
                   series_uid=_text(tags, "SeriesInstanceUID"), sop_uid=_text(tags, "SOPInstanceUID"),
                   patient_id=_text(tags, "PatientID"), modality=_text(tags, "Modality").upper(),
                   description=_text(tags, "SeriesDescription"),
                   body_part=_text(tags, "BodyPartExamined").upper(),
                   attributes={k: _text(tags, k) for k in STUDY_ATTRIBUTES})
    image_type = tags.get("ImageType", None)
    if image_type is not None:
        values = [image_type] if isinstance(image_type, str) else list(image_type)
        ref.image_type = tuple(str(v).strip().upper() for v in values)
    try:
        ref.thickness = finite_number(tags, "SliceThickness")
    except DicomError:  # a bad SliceThickness only leaves the thickness unknown
        pass
    try:
        ref.rows, ref.cols = int(tags.get("Rows", 0) or 0), int(tags.get("Columns", 0) or 0)
        ref.frames = int(tags.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        problems.append("Rows/Columns/NumberOfFrames are not integers")
    for attr, read in (("orientation", _orientation), ("position", lambda d: _floats(d, "ImagePositionPatient", 3))):
        try:
            setattr(ref, attr, read(tags))
        except DicomError as exc:
            problems.append(str(exc))
    try:
        rescale = [finite_number(tags, k) for k in ("RescaleSlope", "RescaleIntercept")]
        ref.has_rescale = None not in rescale or "PixelData" not in ds and "FloatPixelData" in ds
        if rescale[0] == 0:
            problems.append("RescaleSlope is 0")
    except DicomError as exc:
        problems.append(str(exc))
    ref.problem = "; ".join(tags.problems + problems) or None
    return ref


# --- grouping -------------------------------------------------------------------

def _group(input_name: str, refs: list[SliceRef], skipped: list[str], notes: list[str]) -> list[Study]:
    """Slices -> studies -> series; files without UIDs and skipped files become warnings."""
    studies: dict[str, Study] = {}
    orphans = list(notes)
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


def study_from_datasets(datasets: Iterable[Any], name: str) -> list[Study]:
    """Studies from pydicom datasets already in memory (e.g. received by C-STORE),
    grouped as files are. Each dataset keeps its pixel data; nothing is read again.
    Decoding needs each dataset's ``file_meta.TransferSyntaxUID`` (pynetdicom:
    ``ds.file_meta = event.file_meta``)."""
    refs, skipped = [], []
    for n, ds in enumerate(datasets):
        label = f"{name}#{n}"
        if _is_dicomdir(ds):
            skipped.append(label)
            continue
        refs.append(header(ds, label, load=lambda ds=ds: ds))
    return _group(name, refs, skipped, [])


def study_from_bytes(blobs: Iterable[bytes], name: str) -> list[Study]:
    """Studies from DICOM files held as bytes (Part 10 or raw); an unparsable one is a warning."""
    import pydicom

    datasets, notes = [], []
    for n, blob in enumerate(blobs):
        try:
            datasets.append(pydicom.dcmread(io.BytesIO(blob), force=True))
        except Exception as exc:  # pydicom raises many types for damaged data
            notes.append(f"{name}#{n}: unreadable DICOM ({exc.__class__.__name__}); skipped")
    studies = study_from_datasets(datasets, name)
    for study in studies:
        study.warnings += notes
    return studies


# --- files and archives -------------------------------------------------------------

def _is_dicomdir(ds) -> bool:
    sop = str(getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    return sop == DICOMDIR_SOP_CLASS


def _read_header(fp, name: str, load: Callable[[], Any], passthrough: tuple = (),
                 keep: dict | None = None) -> SliceRef | None:
    """Header of one file or stream; None when it is not DICOM (or is a DICOMDIR).
    Exceptions of the ``passthrough`` types are the caller's to name; ``keep`` gets
    the parsed header dataset as "ds"."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=[_tag(k) for k in HEADER_TAGS])
    except passthrough:
        raise
    except (InvalidDicomError, EOFError):
        return None
    except PermissionError:
        return SliceRef(name=name, problem="unreadable (permission denied)")
    except Exception as exc:  # pydicom and zlib raise many types for a damaged header
        return SliceRef(name=name, problem=f"unreadable DICOM header ({exc.__class__.__name__}: {exc})")
    if keep is not None:
        keep["ds"] = ds
    return None if _is_dicomdir(ds) else header(ds, name, load)


def _load_file(path: str):
    import pydicom

    return pydicom.dcmread(path)


class _PixelTail:
    """A slice's pixel data, read from where its header scan stopped: the header is parsed
    once (at the scan; its pixel-module elements kept as read, unconverted), the rest of
    the file or zip member once (when the slice is decoded, in a worker thread)."""

    def __init__(self, source: Callable[[], Any], offset: int, header_ds):
        self.source, self.offset = source, offset  # source() -> a binary file object
        self.encoding = header_ds.original_encoding
        self.syntax = header_ds.file_meta.TransferSyntaxUID
        self.elements = {elem.tag: elem for elem in map(header_ds.get_item, map(_tag, PIXEL_TAGS)) if elem is not None}

    def __call__(self):
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.filereader import read_dataset

        with self.source() as fp:
            fp.seek(self.offset)
            tail = read_dataset(fp, *self.encoding)
        full = Dataset(dict(self.elements))
        full.file_meta = FileMetaDataset()
        full.file_meta.TransferSyntaxUID = self.syntax
        full.set_original_encoding(*self.encoding)
        full.update(tail)
        return full


def _read_file_header(path: str, sniff: bool = False) -> SliceRef | None:
    """Header of one regular file, remembering where its pixel data start; with ``sniff``,
    None for a file that is not DICOM by suffix or 'DICM' marker (one open for both)."""
    try:
        fp = open(path, "rb")
    except PermissionError:
        return SliceRef(name=path, problem="unreadable (permission denied)")
    except OSError as exc:
        return SliceRef(name=path, problem=f"unreadable ({exc.strerror or exc})")
    kept: dict = {}
    with fp:
        if sniff and fp.read(132)[128:] != b"DICM" and Path(path).suffix.lower() not in DICOM_SUFFIXES:
            return None
        fp.seek(0)
        ref = _read_header(fp, path, lambda: _load_file(path), keep=kept)
        offset = fp.tell()
    return _with_tail(ref, kept.get("ds"), functools.partial(open, path, "rb"), offset)


def _with_tail(ref: SliceRef | None, ds, source: Callable[[], Any], offset: int) -> SliceRef | None:
    """``ref`` decoding from ``offset`` of ``source()`` on, its header not parsed again;
    a deflated transfer syntax (one deflate stream for the whole dataset) keeps its load."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ref is not None and ds is not None and syntax is not None and syntax != DeflatedExplicitVRLittleEndian:
        ref.load = _PixelTail(source, offset, ds)
    return ref


class _Zip:
    """A zip archive, opened when a member is read and shared by the decode threads
    (reads under a lock); ``close`` releases it."""

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        self.archive: zipfile.ZipFile | None = None
        self.lock = threading.Lock()

    def _open(self) -> zipfile.ZipFile:
        if self.archive is None:
            self.archive = zipfile.ZipFile(self.path)
        return self.archive

    def members(self) -> list[zipfile.ZipInfo]:
        with self.lock:
            return [m for m in self._open().infolist() if not m.is_dir()]

    def budget_problem(self, info: zipfile.ZipInfo) -> str | None:
        if info.file_size > self.max_bytes:
            return (f"zip entry of {info.file_size:,} bytes uncompressed is above the {self.max_bytes:,}-byte "
                    "budget (raise it with ctedge --max-bytes N); not inflated")
        return None

    def read(self, info: zipfile.ZipInfo) -> bytes:
        """The member's bytes; never more than its declared size (already within budget)."""
        with self.lock, self._open().open(info) as member:
            return member.read(info.file_size)

    def inflated(self, info: zipfile.ZipInfo) -> io.BytesIO:
        """The member inflated (once), as a file; a corrupt entry is DicomError naming it."""
        try:
            return io.BytesIO(self.read(info))
        except Exception as exc:  # zlib.error, BadZipFile (CRC), OSError, EOFError
            raise DicomError(f"corrupt zip entry ({exc.__class__.__name__}: {exc})") from None

    def load(self, info: zipfile.ZipInfo):
        """The whole member as a dataset (a deflated transfer syntax: no tail to start at)."""
        import pydicom

        data = self.inflated(info)
        try:
            return pydicom.dcmread(data)
        except Exception as exc:  # pydicom's many types
            raise DicomError(f"corrupt zip entry ({exc.__class__.__name__}: {exc})") from None

    def header(self, info: zipfile.ZipInfo, name: str) -> SliceRef | None:
        """The member's header, inflating only its start; its pixels are read from there on
        when the slice is decoded."""
        problem = self.budget_problem(info)
        if problem:
            return SliceRef(name=name, problem=problem)
        kept: dict = {}
        try:
            with self.lock, self._open().open(info) as member:
                ref = _read_header(member, name, lambda: self.load(info),
                                   passthrough=(zlib.error, zipfile.BadZipFile), keep=kept)
                offset = member.tell()
        except Exception as exc:  # zlib.error, BadZipFile (CRC), OSError
            return SliceRef(name=name, problem=f"corrupt zip entry ({exc.__class__.__name__}: {exc})")
        return _with_tail(ref, kept.get("ds"), functools.partial(self.inflated, info), offset)

    def close(self) -> None:
        with self.lock:
            if self.archive is not None:
                self.archive.close()
                self.archive = None


def _read_zip(path: Path, max_bytes: int) -> list[Study]:
    archive = _Zip(path, max_bytes)
    refs: list[SliceRef] = []
    skipped: list[str] = []
    try:
        for info in archive.members():
            name = f"{path}:{info.filename}"
            base = info.filename.rsplit("/", 1)[-1]
            if base.upper() == "DICOMDIR" or base.startswith("."):
                continue
            ref = archive.header(info, name)
            (skipped.append(name) if ref is None else refs.append(ref))
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as exc:
        archive.close()
        return [Study(str(path), "", error=f"unreadable zip archive ({exc})")]
    archive.close()  # reopened if a slice is decoded; Study.close releases it again
    studies = _group(str(path), refs, skipped, [])
    for study in studies:
        study.close = archive.close
    return studies


def _walk(folder: Path) -> tuple[list[Path], list[str]]:
    """Files under ``folder`` (sorted, hidden and DICOMDIR left out) and notes on what
    could not be looked into."""
    notes: list[str] = []
    files: list[Path] = []

    def unreadable(error: OSError) -> None:
        notes.append(f"{error.filename}: folder unreadable ({error.strerror}); skipped")

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in names if not n.startswith(".") and n.upper() != "DICOMDIR"]
    return sorted(files), notes


def _read_folder(path: Path) -> list[Study]:
    files, notes = _walk(path)
    refs: list[SliceRef] = []
    skipped: list[str] = []
    special: list[str] = []
    for file in files:
        problem = regular_file_problem(file)
        if problem and "permission" in problem:
            refs.append(SliceRef(name=str(file), problem=problem))
        elif problem:
            special.append(f"{file}: {problem}")
        elif file.name.lower().endswith(NIFTI_SUFFIXES):
            skipped.append(f"{file} (NIfTI: pass it as its own input)")
        else:
            ref = _read_file_header(str(file), sniff=True)
            (skipped.append(str(file)) if ref is None else refs.append(ref))
    if special:
        notes.append(f"{len(special)} special file(s) skipped ({special[0]})")
    return _group(str(path), refs, skipped, notes)


def find_studies(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int | None = None) -> list[Study]:
    """Every study under one input: a folder (recursive), a .zip, a NIfTI volume or one
    DICOM file. Never raises for bad content: a study that can't be read comes back
    with ``error``. Release it with ``study.close()`` when done."""
    path = Path(path)
    name = str(path)
    if not os.path.lexists(path):
        return [Study(name, "", error="no such file or folder")]
    problem = regular_file_problem(path)
    if problem == "a folder":
        return _read_folder(path)
    if problem:
        return [Study(name, "", error=problem)]
    if name.lower().endswith(NIFTI_SUFFIXES):
        return [read_nifti(path, max_bytes, max_pixels or DEFAULT_MAX_PIXELS)]
    if zipfile.is_zipfile(path):
        return _read_zip(path, max_bytes)
    if path.suffix.lower() == ".zip":
        return [Study(name, "", error="unreadable zip archive (not a zip file or truncated)")]
    ref = _read_file_header(name) if is_dicom(path) else None
    if ref is None:
        return [Study(name, "", error="not a DICOM file, zip archive, NIfTI volume or folder")]
    return _group(name, [ref], [], [])
