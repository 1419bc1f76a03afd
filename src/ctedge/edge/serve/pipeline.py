"""The one place the node meets the study pipeline (``ctedge.edge.study``).

A received study is classified from its spool folder (the instances fsynced before
they were acknowledged, so a restart classifies exactly what was received); the
headers of its top slices come back for the SR's references.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom

from ctedge.edge.study import StudyOptions, StudyResult, classify_study, find_studies, predict_studies, studies_report
from ctedge.edge.study.select import find_gaps, order_slices

EVIDENCE_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
                 "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "SpecificCharacterSet",
                 # what the SR's Image Library says of each referenced slice (TID 1602/1604)
                 "Modality", "FrameOfReferenceUID", "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient",
                 "ImagePositionPatient", "SliceThickness"]


@dataclass
class Answer:
    """A study's result, with the headers (no pixels) of the slices the SR references."""

    result: StudyResult
    evidence: list = field(default_factory=list)  # pydicom Datasets of the top slices
    gaps: list[str] = field(default_factory=list)  # gaps in the chosen series' slice positions


def classify_spooled(clf, folder: Path, study_uid: str, options: StudyOptions) -> Answer:
    """Classify the study ``study_uid`` held in ``folder``."""
    studies = [s for s in find_studies(folder, options.max_bytes, options.max_pixels) if s.study_uid == study_uid]
    if not studies:
        return Answer(StudyResult(input=study_uid, study_uid=study_uid, error="no readable CT instance received"))
    study = studies[0]
    try:
        result = replace(classify_study(clf, study, options), input=study_uid)
        gaps = find_gaps(order_slices(study.series[result.series_uid])[1]) if result.series_uid else []
    finally:
        study.close()
    if result.error or result.not_eligible or not result.series_uid:  # no SR: nothing to reference
        return Answer(result, gaps=gaps)
    evidence = [pydicom.dcmread(top.source, stop_before_pixels=True, specific_tags=EVIDENCE_TAGS)
                for top in result.top_slices]
    return Answer(result, evidence, gaps)


def classify_paths(clf, paths: list[Path], options: StudyOptions) -> list[StudyResult]:
    """Every study under the paths (an uploaded zip or NIfTI), as `predict --study` does."""
    return predict_studies(clf, paths, options)


def as_uploaded(result: StudyResult, name: str) -> StudyResult:
    """A result read from an upload's temp file, named as the client named the upload
    (its input and each slice's source), so no server path leaks into the answer."""
    def renamed(score):
        return replace(score, source=score.source.replace(result.input, name, 1))

    return replace(result, input=name, slices=tuple(map(renamed, result.slices)),
                   top_slices=tuple(map(renamed, result.top_slices)))


def study_document(clf, model: Path | str, options: StudyOptions, results: list[StudyResult]) -> dict:
    """The JSON document of `ctedge predict --study --json`, built by the same library function."""
    return studies_report(clf, model, options, results).to_dict()
