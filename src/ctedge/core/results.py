"""Typed results: what the library builds and the CLI, the HTTP API and the SR writer
only print or send.

Each result is a frozen dataclass with one ``to_dict()``, which is its JSON schema:
every field is always present (``None`` when absent), so consumers parse without
guessing. A top-level ``Document`` adds ``schema_version``, ``ctedge_version`` and its
``kind``. ``dumps`` writes strict JSON: a NaN or infinity is a bug, never a value.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ctedge import __version__

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def plain(value: Any) -> Any:
    """A JSON-ready copy: records to dicts, tuples to lists, paths and enums to strings,
    numpy scalars to Python numbers."""
    if isinstance(value, Record):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@dataclass(frozen=True, kw_only=True)
class Record:
    """A typed row inside a document; ``to_dict`` emits every field."""

    def to_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.repr}

    @classmethod
    def keys(cls) -> list[str]:
        """The keys ``to_dict`` emits, in order (the schema a test checks ``--json`` against)."""
        return [f.name for f in fields(cls) if f.repr]


@dataclass(frozen=True, kw_only=True)
class Document(Record):
    """A top-level result: a versioned header, then the record's own fields."""

    kind: ClassVar[str] = "document"
    HEADER: ClassVar[tuple[str, ...]] = ("schema_version", "ctedge_version", "kind")

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "ctedge_version": __version__, "kind": self.kind,
                **super().to_dict()}

    @classmethod
    def keys(cls) -> list[str]:
        return [*cls.HEADER, *super().keys()]


def _finite(value: Any, where: str, strict: bool) -> Any:
    """``value`` with every NaN/infinity found: an error when ``strict``, else null and a warning."""
    if isinstance(value, float) and not math.isfinite(value):
        if strict:
            raise ValueError(f"{where} is {value}: results never hold NaN or infinity")
        log.warning("%s is %s: written as null (JSON has no NaN or infinity)", where, value)
        return None
    if isinstance(value, dict):
        return {key: _finite(item, f"{where}.{key}", strict) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item, f"{where}[{i}]", strict) for i, item in enumerate(value)]
    return value


def dumps(document: Record | dict, strict: bool = True) -> str:
    """JSON (``allow_nan=False``), indented, with a trailing newline. A typed result never
    holds NaN (``strict``: an error); a free-form report's NaN (an undefined metric) is
    written as null with a warning naming where it was."""
    data = document.to_dict() if isinstance(document, Record) else plain(document)
    return json.dumps(_finite(data, "$", strict), indent=2, allow_nan=False, default=str) + "\n"


def save_json(document: Record | dict, path: Path) -> None:
    """``dumps(document, strict=False)`` written atomically: a free-form file (a model card,
    a tuning summary) whose undefined metric (NaN) becomes null with a warning."""
    from ctedge.core.files import atomic_write

    atomic_write(dumps(document, strict=False).encode(), path)


# --- images (`ctedge predict`): built by ctedge.edge.runtime ------------------------

@dataclass(frozen=True, kw_only=True)
class EngineInfo(Record):
    """What a result was computed on, as resolved and confirmed by the backend."""

    runtime: str  # the engine (onnxruntime, openvino)
    device: str  # the one device asked for: cpu, cuda, tensorrt, gpu, npu
    providers: tuple[str, ...]  # what the backend reports it runs on
    precision: str
    file: str  # the model file run (a variant file for fp16/int8)
    provider_options: dict  # the backend options the session was given
    fixed_batch: int | None  # calls padded to this batch size (one input shape), or None
    source_sha256: str | None  # the trained model's sha256 recorded in the export's metadata


@dataclass(frozen=True, kw_only=True)
class ImagePrediction(Record):
    """One image's answer; ``error`` instead of a probability when it could not be read."""

    path: str
    probability: float | None = None
    label: str | None = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class ImagePredictions(Document):
    """`ctedge predict`: one row per image."""

    kind: ClassVar[str] = "predictions"
    model: str
    engine: EngineInfo
    runtime: str
    precision: str
    provider: str  # the backend's first provider/device
    positive: str
    threshold: float
    predictions: tuple[ImagePrediction, ...]
    warnings: tuple[str, ...] = ()



# --- studies (`ctedge predict --study`, the DICOM node, the HTTP API): built by ctedge.edge.study

@dataclass(frozen=True, kw_only=True)
class SliceScore(Record):
    """One classified slice of a study: its place in the ordered series and its image."""

    index: int  # in the series ordered along the slice normal
    position_mm: float
    probability: float
    sop_instance_uid: str  # empty for NIfTI
    source: str  # file path, ZIP:member, NIFTI#index or NAME#n


@dataclass(frozen=True, kw_only=True)
class RejectedSeries(Record):
    """A series of the study that was not classified, and why."""

    series_uid: str
    slices: int
    description: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class StudyResult(Record):
    """One study's answer (or its ``error``, or why it is ``not_eligible``); ``to_dict`` is one entry of
    ``predict --study --json``'s ``studies``. ``attributes`` holds what a structured
    report needs (AccessionNumber, StudyDate, PatientName, ...), empty when absent."""

    input: str
    study_uid: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    series_uid: str = ""
    series_description: str = ""
    slices_total: int = 0
    positions: int = 0  # distinct slice positions in the chosen series
    slices_sampled: int = 0
    slices_failed: int = 0
    slices_without_lung: int = 0
    slices_used: int = 0
    slice_step: int = 0
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    aggregate: str = ""
    top_slices: tuple[SliceScore, ...] = ()
    slices: tuple[SliceScore, ...] = ()
    series_rejected: tuple[RejectedSeries, ...] = ()
    warnings: tuple[str, ...] = ()
    error: str | None = None
    not_eligible: str | None = None  # why no series met the rules: no answer, and not an error
    timings_s: dict[str, float] = field(default_factory=dict)
    thumbnails: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)  # index -> 8-bit image

    @property
    def answered(self) -> bool:
        """Whether the study got a probability (neither an error nor not eligible)."""
        return self.error is None and self.not_eligible is None

    @property
    def no_answer(self) -> str | None:
        """Why the study got no probability, in words; None when it got one."""
        return self.error or (f"not eligible: {self.not_eligible}" if self.not_eligible else None)


@dataclass(frozen=True, kw_only=True)
class StudiesReport(Document):
    """`ctedge predict --study --json`: the model, the options and one result per study."""

    kind: ClassVar[str] = "studies"
    model: str
    engine: EngineInfo | None  # None for a backend that is not a ctedge Classifier
    runtime: str
    precision: str
    provider: str
    threshold: float
    options: dict[str, Any]
    studies: tuple[StudyResult, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ArchiveRun(Document):
    """`ctedge predict --study --ray`: one run over an archive, its rows in a Parquet folder
    (``ctedge.edge.batch``); a resumed run counts what it found there as ``skipped``."""

    kind: ClassVar[str] = "archive_run"
    model: str
    parquet: str
    runtime: str
    precision: str
    address: str  # the Ray cluster: local, or the address given
    actors: int
    cpus_per_actor: int
    studies_per_batch: int
    inputs: int  # distinct study references given
    repeated: int  # references listed more than once (scored once)
    skipped: int  # inputs already in the Parquet
    scored: int  # inputs scored by this run
    rows_written: int  # studies (a folder may hold several)
    errors_written: int
    parts_written: int
    errors: int  # error rows of the given inputs in the Parquet after this run
    ray_startup_s: float | None  # None: nothing to score, or a Ray this process already held
    seconds: float  # scoring, Ray's start-up excluded
    studies_per_s: float | None



# --- benchmarks (`ctedge bench`): built by ctedge.edge.bench -------------------------

@dataclass(frozen=True, kw_only=True)
class BenchRow(Record):
    """One model on one engine, precision and device (timings in ms; nested stats as dicts)."""

    model: str
    format: str  # RUNTIME-PRECISION, or the baseline's name
    file: str | None = None
    runtime: str | None = None
    precision: str | None = None
    provider: str | None = None  # the backend's first provider/device
    provider_option: str | None = None  # the --provider value asked for
    engine: EngineInfo | None = None
    size_mb: float | None = None
    input_size: int | None = None
    cold_start_ms: dict | None = None  # session build, warm-up, first inference, fresh process
    latency: dict | None = None  # batch size -> stats and images_per_s
    inference_ms: dict | None = None
    samples_ms: list | None = None
    end_to_end_ms: dict | None = None
    budget: dict | None = None
    output_spread: float | None = None
    constant_warning: str | None = None
    accuracy_detail: dict | None = None
    auc: float | None = None
    accuracy: float | None = None
    vs_fp32: dict | None = None

    @classmethod
    def from_dict(cls, row: dict) -> "BenchRow":
        """A row from a measuring function's dict (unknown keys are a bug)."""
        return cls(**row)


@dataclass(frozen=True, kw_only=True)
class BenchReport(Document):
    """`ctedge bench`: the machine, the options, one row per model and variant."""

    kind: ClassVar[str] = "bench"
    machine: dict
    options: dict
    data: str
    accuracy_data: str | None
    results: tuple[BenchRow, ...]
    fastest: dict  # model -> the fastest variant within tolerance



# --- evaluation (`ctedge evaluate`): built by ctedge.evaluation ----------------------


def finite(value: float | None) -> float | None:
    """``value`` as a float, or None where it is undefined (NaN: one class, no images)."""
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True, kw_only=True)
class Estimate(Record):
    """A metric and its bootstrap 95% CI; None where undefined (e.g. AUC with one class)."""

    value: float | None
    ci95: tuple[float | None, float | None]

    @classmethod
    def of(cls, value: float, ci95) -> "Estimate":
        return cls(value=finite(value), ci95=(finite(ci95[0]), finite(ci95[1])))


@dataclass(frozen=True, kw_only=True)
class Scores(Record):
    """What every evaluation reports, of images or of studies."""

    threshold: float
    positive: int
    metrics: dict[str, Estimate]
    operating_points: dict[str, float]
    confusion: list[list[int]]  # [[TN, FP], [FN, TP]]
    ece: float | None
    output_spread: float | None
    shortcut_baseline: dict  # the metadata-only baseline's figures (ctedge.evaluation.audit); {} when none
    roc_png: str | None = None  # None with one class
    calibration_png: str | None = None
    out_dir: str | None = None

    @staticmethod
    def fields_from(data: dict) -> dict:
        """The shared fields of a metrics.json (or an evaluation dict), typed."""
        return {"threshold": data["threshold"], "positive": data["positive"],
                "metrics": {name: Estimate.of(m["value"] if m["value"] is not None else math.nan,
                                              [math.nan if v is None else v for v in m["ci95"]])
                            for name, m in data["metrics"].items()},
                "operating_points": data["operating_points"], "confusion": data["confusion"],
                "ece": finite(data.get("ece")), "output_spread": finite(data.get("output_spread")),
                "shortcut_baseline": data.get("shortcut_baseline") or {},
                "roc_png": data.get("roc_png"), "calibration_png": data.get("calibration_png"),
                "out_dir": data.get("out_dir")}

    @classmethod
    def from_dict(cls, data: dict) -> "Scores":
        return cls(**cls.fields_from(data))


@dataclass(frozen=True, kw_only=True)
class ImageEvaluation(Scores, Document):
    """`ctedge evaluate MODEL.keras DATA`: a saved model scored on a split of a data folder
    (or every image of an external data set); ``metrics.json`` in ``out_dir`` holds it too."""

    kind: ClassVar[str] = "evaluation"
    model: str
    data: dict  # the DataOptions the split was rebuilt with
    split: str  # train | val | test | all | external
    external: bool
    group_regex: str | None  # what the bootstrap resampled by; None: images
    split_drift: dict[str, dict[str, int]]  # split -> recorded files missing / new, where they differ
    images: int
    groups: int | None
    skipped: list[dict]  # unreadable files: path, reason
    dropped_annotated: list[str]
    predictions_csv: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "ImageEvaluation":
        return cls(**cls.fields_from(data), **{name: data.get(name) for name in (
            "model", "data", "split", "external", "group_regex", "split_drift", "images", "groups",
            "skipped", "dropped_annotated", "predictions_csv")})

    @property
    def scored(self) -> int:
        """How many answers were scored (images)."""
        return self.images


@dataclass(frozen=True, kw_only=True)
class StudyEvaluation(Scores, Document):
    """`ctedge evaluate MODEL.onnx STUDIES --study`: one answer per study, as ``predict
    --study`` gives it, the CIs resampled by patient."""

    kind: ClassVar[str] = "study_evaluation"
    model: str
    provider: str
    runtime: str | None  # the engine and precision the studies ran on (None: an older metrics.json)
    precision: str | None
    data: str
    split: str = "studies"
    unit: str = "study"
    classes: list[str]
    studies: int
    patients: int
    failed: list[dict]  # input, study_uid, error: studies that got no answer
    warnings: list[str]
    options: dict  # the StudyOptions used
    studies_csv: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "StudyEvaluation":
        return cls(**cls.fields_from(data), **{name: data.get(name) for name in (
            "model", "provider", "runtime", "precision", "data", "classes", "studies", "patients", "failed",
            "warnings", "options", "studies_csv")})

    @property
    def scored(self) -> int:
        """How many answers were scored (studies)."""
        return self.studies


def evaluation_from_dict(data: dict) -> ImageEvaluation | StudyEvaluation:
    """A metrics.json (or an evaluation dict) as its typed record."""
    return (StudyEvaluation if data.get("unit") == "study" else ImageEvaluation).from_dict(data)
