"""What the read stage hands the others: ``SliceRef`` (one slice's header values and how
to load its pixels) and ``Study`` (the slices of one StudyInstanceUID, by series). Their
own module, so each reader (``read``, ``nifti``) imports them without importing the other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SliceRef:
    """One slice: where it is, the header values the pipeline and the result need,
    and how to get its full dataset (``load``)."""

    name: str  # file path, ZIP:member, NIFTI#index or NAME#n (in memory); shown in messages
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    patient_id: str = ""
    attributes: dict[str, str] = field(default_factory=dict)  # STUDY_ATTRIBUTES
    modality: str = ""
    image_type: tuple[str, ...] = ()
    description: str = ""
    body_part: str = ""  # BodyPartExamined
    thickness: float | None = None  # SliceThickness (mm); None when absent or not a number
    rows: int = 0
    cols: int = 0
    frames: int = 1
    orientation: tuple[float, ...] | None = None
    position: tuple[float, ...] | None = None
    has_rescale: bool = True
    problem: str | None = None  # a header value that makes the slice unusable
    load: Callable[[], Any] | None = field(default=None, repr=False)  # -> pydicom Dataset or HU array


@dataclass
class Study:
    """The slices of one StudyInstanceUID found in one input."""

    input: str
    study_uid: str
    patient_id: str = ""
    series: dict[str, list[SliceRef]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    close: Callable[[], None] = field(default=lambda: None, repr=False)  # releases an open archive
