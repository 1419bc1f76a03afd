"""One received instance into the spool, whichever way it came (C-STORE, STOW-RS, a poll):
the same header read, UID checks, SOP class rules, instance and disk limits, and the same
DICOM status for each outcome.
"""

from __future__ import annotations

import io
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ctedge.edge.serve.guard import uid_problem
from ctedge.edge.serve.spool import Incoming, Spool, Stored, uid_hash

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
REFUSED_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage is not supported yet",
                       "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT is not supported yet"}
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID",
               "ImagesInAcquisition"]
SUCCESS = 0x0000
DUPLICATE = -1  # internal: acknowledged as a success, counted once
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
OTHER = -2  # internal: not a CT image (an SR, a dose report): acknowledged as a success, not kept


@dataclass(frozen=True)
class Outcome:
    """What became of one instance: its DICOM status (or DUPLICATE, OTHER), why it was refused,
    and the UIDs its header gave (for a STOW-RS response)."""

    status: int
    reason: str | None = None
    sop_class: str = ""
    sop_uid: str = ""

    @property
    def kept(self) -> bool:
        """Acknowledged as a success: stored, held already, or not a CT image."""
        return self.status in (SUCCESS, DUPLICATE, OTHER)


def read_header(source: bytes | Path):
    """The header tags the node needs (no pixels); raises what pydicom raises on a damaged file."""
    import pydicom

    return pydicom.dcmread(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                           stop_before_pixels=True, specific_tags=HEADER_TAGS)


def expected_count(ds) -> int | None:
    """The instance's ImagesInAcquisition when it gives a usable one (a hint, never a refusal)."""
    try:
        value = int(ds.get("ImagesInAcquisition") or 0)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def sop_class_outcome(sop_class: str) -> Outcome | None:
    """The outcome a SOP class decides alone (refused, or acknowledged and not kept); None for CT images."""
    if sop_class in REFUSED_SOP_CLASSES:
        log.warning("instance refused: %s", REFUSED_SOP_CLASSES[sop_class])
        return Outcome(SOP_CLASS_NOT_SUPPORTED, REFUSED_SOP_CLASSES[sop_class], sop_class)
    if sop_class != CT_IMAGE_STORAGE:  # an SR, a dose report, a key image: nothing to classify
        return Outcome(OTHER, None, sop_class)
    return None


def keep(spool: Spool, source: bytes | Path, association: str, header=None) -> Outcome:
    """Spool one CT Image Storage instance (its bytes, or a file under the spool that is moved);
    ``header``: its header when already read."""
    try:
        ds = header if header is not None else read_header(source)
        study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        sop_class, series_uid = str(ds.get("SOPClassUID", "")), str(ds.get("SeriesInstanceUID", ""))
    except Exception as exc:  # a dataset pydicom can't read, or without its UIDs
        log.warning("instance refused: unreadable dataset or no StudyInstanceUID/SOPInstanceUID (%s)",
                    exc.__class__.__name__)
        return Outcome(CANNOT_UNDERSTAND, f"not a readable DICOM dataset with its UIDs ({exc.__class__.__name__})")
    problem = uid_problem(ds)
    if problem:  # never into the spool, nor into an SR
        log.warning("instance refused: %s", problem)
        return Outcome(CANNOT_UNDERSTAND, problem, echoed(sop_class), echoed(sop_uid))
    data, path = (source, None) if isinstance(source, (bytes, bytearray)) else (None, Path(source))
    incoming = Incoming(study_uid, sop_uid, series_uid, expected_count(ds), data, path)
    try:
        stored = spool.store(incoming, association)
    except (OSError, sqlite3.Error) as exc:  # a read-only spool, a broken journal: the sender keeps it
        reason = f"cannot write the spool ({getattr(exc, 'strerror', None) or exc})"
        log.error("instance of study %s refused (out of resources): %s", uid_hash(study_uid), reason)
        return Outcome(OUT_OF_RESOURCES, reason, sop_class, sop_uid)
    if stored in (Stored.STUDY_FULL, Stored.DISK_LOW, Stored.PAUSED):
        log.warning("instance of study %s refused (out of resources): %s", uid_hash(study_uid), stored.value)
        return Outcome(OUT_OF_RESOURCES, stored.value, sop_class, sop_uid)
    return Outcome(DUPLICATE if stored is Stored.DUPLICATE else SUCCESS, None, sop_class, sop_uid)


def echoed(value: str) -> str:
    """A UID as a response may repeat it: itself when it is a valid UID, else empty."""
    from pydicom.uid import RE_VALID_UID

    return value if len(value) <= 64 and RE_VALID_UID.match(value) else ""
