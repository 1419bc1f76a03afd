"""What both pull clients share: study and series references, the bounds on what a PACS
may send (``PullOptions``), the query, and ``InstanceSink``, which checks every received
instance against what was asked before it is kept.

Everything a PACS sends is input: UIDs must be UIDs (they go into URLs and identifiers),
counts are bounded, and an instance of another study, series or patient than the one
asked for refuses the whole series.
"""

from __future__ import annotations

import datetime
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ctedge.core.errors import CtedgeError
from ctedge.edge.study.read import DEFAULT_MAX_BYTES
from ctedge.edge.study.rules import SeriesFacts

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID = 64
MAX_TEXT = 256  # a header value kept from a PACS's answer (VR LO allows 64)
STUDY_KEYS = ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "StudyTime", "ModalitiesInStudy",
              "StudyDescription", "NumberOfStudyRelatedInstances")
SERIES_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "BodyPartExamined",
               "NumberOfSeriesRelatedInstances")
CHECKED_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"]


class PullError(CtedgeError):
    """A PACS that cannot be reached, refuses, or answers what it must not; names the PACS."""


@dataclass(frozen=True, kw_only=True)
class PullOptions:
    """Bounds on what a PACS may send; checked when made."""

    max_studies: int = 100  # a query matching more is refused (narrow it), nothing retrieved
    max_series: int = 500  # series of one study
    max_instances: int = 3000  # instances of one series
    max_bytes: int = DEFAULT_MAX_BYTES  # of one series retrieved (and of a DICOMweb part)
    max_answer_bytes: int = 8 << 20  # of one QIDO-RS JSON answer
    timeout_s: float = 30.0  # without a byte or a DIMSE message from the PACS
    deadline_s: float = 600.0  # for one series retrieved, however slowly it trickles in

    def __post_init__(self) -> None:
        for name in ("max_studies", "max_series", "max_instances", "max_bytes", "max_answer_bytes"):
            if getattr(self, name) < 1:
                raise CtedgeError(f"must be at least 1, not {getattr(self, name)}", param=name)
        for name in ("timeout_s", "deadline_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise CtedgeError(f"must be a positive number of seconds, not {value}", param=name)


@dataclass(frozen=True)
class StudyRef:
    """A study as a PACS's query answered it."""

    study_uid: str
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    modalities: tuple[str, ...] = ()
    description: str = ""
    instances: int | None = None  # NumberOfStudyRelatedInstances, when the PACS says


@dataclass(frozen=True)
class SeriesRef:
    """A series as a PACS's series-level query answered it; None where it did not say."""

    series_uid: str
    modality: str | None = None
    description: str | None = None
    body_part: str | None = None
    image_type: tuple[str, ...] | None = None
    thickness_mm: float | None = None
    instances: int | None = None

    def facts(self) -> SeriesFacts:
        """What the rules can judge before anything is retrieved."""
        return SeriesFacts(modality=self.modality, image_type=self.image_type, description=self.description,
                           body_part=self.body_part, thickness_mm=self.thickness_mm, slices=self.instances)


def check_uid(value: object, what: str, source: str) -> str:
    """A UID from the network, or PullError: it goes into URLs and identifiers."""
    text = str(value or "").strip().rstrip("\0")
    if not text or len(text) > MAX_UID or not UID.match(text):
        raise PullError(f"{source}: answered a {what} that is not a UID ({text[:80]!r}); refused")
    return text


def text(value: object) -> str:
    """A text value from the network, bounded."""
    if isinstance(value, (list, tuple)):
        value = "\\".join(map(str, value))
    return str(value if value is not None else "").strip()[:MAX_TEXT]


def count(value: object) -> int | None:
    """A non-negative integer from the network; None when it is not one."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def thickness(value: object) -> float | None:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def default_query(today: datetime.date | None = None) -> dict[str, str]:
    """CT studies of today."""
    return {"StudyDate": (today or datetime.date.today()).strftime("%Y%m%d"), "ModalitiesInStudy": "CT"}


def parse_query(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` texts (``--query``) as a query; keys are DICOM keywords. None or empty:
    the default (CT studies of today)."""
    from pydicom.datadict import tag_for_keyword

    if not pairs:
        return default_query()
    query = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CtedgeError(f"must be KEY=VALUE, not {pair!r}", param="query")
        if tag_for_keyword(key) is None:
            raise CtedgeError(f"{key!r} is not a DICOM keyword (e.g. StudyDate, AccessionNumber, PatientID, "
                              "ModalitiesInStudy)", param="query")
        if key in ("QueryRetrieveLevel",):
            raise CtedgeError(f"{key} is set by ctedge", param="query")
        query[key] = value.strip()
    return query


AE_TITLE = re.compile(r"^[ -~]{1,16}$")


def check_ae_title(value: str, param: str) -> str:
    """A DICOM AE title: 1-16 printable ASCII characters, no backslash, no outer spaces."""
    if not AE_TITLE.match(value) or value.strip() != value or "\\" in value:
        raise CtedgeError(f"{value!r} is not an AE title (1-16 printable ASCII characters, no backslash)",
                          param=param)
    return value


def parse_peer(value: str, param: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` as (AE title, host, port)."""
    match = re.fullmatch(r"(.+)@([^:@\s]+|\[[0-9a-fA-F:]+\]):(\d{1,5})", value.strip())
    if not match or not 0 < int(match[3]) < 65536:
        raise CtedgeError(f"must be AET@HOST:PORT, not {value!r}", param=param)
    return check_ae_title(match[1], param), match[2].strip("[]"), int(match[3])


def decodable_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data an installed pydicom plugin decodes."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    syntaxes = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                syntaxes.append(str(uid))
        except NotImplementedError:
            continue
    return syntaxes


class InstanceSink:
    """Where the instances of one retrieved series go: each is checked (the study, series and
    patient asked for; a new SOPInstanceUID) and counted (``max_instances``, ``max_bytes``)
    before it is kept, under a generated name (never one made from a UID)."""

    def __init__(self, folder: Path, study: StudyRef, series_uid: str, options: PullOptions, source: str):
        self.folder, self.study, self.series_uid = Path(folder), study, series_uid
        self.options, self.source = options, source
        self.count = 0
        self.bytes = 0
        self.sop_uids: set[str] = set()
        self.problem: PullError | None = None

    def reserve(self, size: int) -> None:
        """Count ``size`` more bytes of this series; PullError past ``max_bytes``."""
        self.bytes += size
        if self.bytes > self.options.max_bytes:
            self.fail(f"sent more than {self.options.max_bytes:,} bytes for series {self.series_uid} "
                      "(raise it with ctedge --max-bytes N); refused")

    def next_path(self) -> Path:
        """A new file for the next instance; PullError past ``max_instances``."""
        if self.count >= self.options.max_instances:
            self.fail(f"sent more than {self.options.max_instances} instances for series {self.series_uid}; refused")
        self.count += 1
        return self.folder / f"{self.count:06d}.dcm"

    def add(self, data: bytes) -> None:
        """Check and keep one instance received whole (DIMSE)."""
        self.reserve(len(data))
        path = self.next_path()
        self.check(io.BytesIO(data), path.name)
        path.write_bytes(data)

    def check(self, fp, name: str) -> None:
        """PullError unless the instance is of the study, series and patient asked for."""
        import pydicom

        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=CHECKED_TAGS, force=True)
            study, series, sop = (str(ds.get(k, "") or "") for k in CHECKED_TAGS[:3])
            patient = str(ds.get("PatientID", "") or "")
        except Exception as exc:  # pydicom raises many types for damaged data
            self.fail(f"sent an unreadable DICOM instance ({exc.__class__.__name__}: {exc}); refused")
        if study != self.study.study_uid or series != self.series_uid:
            self.fail(f"sent an instance of study {study[:80]!r}, series {series[:80]!r} when study "
                      f"{self.study.study_uid}, series {self.series_uid} was asked for; refused (the UIDs must "
                      "match what was asked)")
        if self.study.patient_id and patient != self.study.patient_id:
            self.fail(f"sent an instance of another patient for study {self.study.study_uid} (PatientID "
                      "differs from the query's answer); refused")
        if sop in self.sop_uids:
            self.fail(f"sent SOPInstanceUID {sop[:80]!r} twice; refused")
        self.sop_uids.add(check_uid(sop, "SOPInstanceUID", self.source))

    def fail(self, message: str) -> None:
        """Record the first problem and raise it; the retrieval stops."""
        self.problem = self.problem or PullError(f"{self.source}: {message}")
        raise self.problem
