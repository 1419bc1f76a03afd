"""The one place the node meets the study pipeline (``ctedge.edge.study``).

Today's API classifies studies found under a path, so the node classifies the spool
folder of a study (the instances it fsynced) and maps the top slices back to their
SOPInstanceUIDs here. When ``study_from_datasets`` lands, only this module changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ctedge.edge.study import StudyOptions, StudyResult, classify_study, find_studies, order_slices, predict_studies

EVIDENCE_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
                 "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "SpecificCharacterSet"]


@dataclass
class Answer:
    """A study's result, with the headers (no pixels) of the slices the SR references."""

    result: StudyResult
    evidence: list = field(default_factory=list)  # pydicom Datasets of the top slices


def classify_spooled(clf, folder: Path, study_uid: str, options: StudyOptions) -> Answer:
    """Classify the study ``study_uid`` held in ``folder``; top slices gain ``sop_instance_uid``."""
    import pydicom

    studies = [s for s in find_studies(folder) if s.study_uid == study_uid]
    if not studies:
        return Answer(StudyResult(input=study_uid, study_uid=study_uid, error="no readable CT instance received"))
    study = studies[0]
    result = classify_study(clf, study, options)
    result.input = study_uid
    if result.error or not result.series_uid:
        return Answer(result)
    ordered, _, _ = order_slices(study.series[result.series_uid])
    evidence = []
    for top in result.top_slices:
        ds = pydicom.dcmread(ordered[top["index"]].open(), stop_before_pixels=True, specific_tags=EVIDENCE_TAGS)
        top["sop_instance_uid"] = str(ds.SOPInstanceUID)
        evidence.append(ds)
    return Answer(result, evidence)


def classify_paths(clf, paths: list[Path], options: StudyOptions) -> list[StudyResult]:
    """Every study under the paths (an uploaded zip or NIfTI), as `predict --study` does."""
    return predict_studies(clf, paths, options)


def study_document(clf, model: Path | str, options: StudyOptions, results: list[StudyResult]) -> dict:
    """The JSON document of `ctedge predict --study --json` (the same keys, the same values)."""
    return {"model": str(model), "provider": clf.providers[0], "threshold": clf.threshold,
            "options": {k: v for k, v in vars(options).items() if k != "keep_thumbnails"},
            "studies": [r.to_dict() for r in results]}
