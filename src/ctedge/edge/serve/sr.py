"""The answer as a DICOM Comprehensive 3D SR (TID 1500 measurement report, highdicom).

The report holds the finding (COVID-19: Present or Absent), the patient probability,
the threshold, the number of slices used (an integer), the algorithm (name, version,
model sha256) and the top slices as referenced images. Patient and study attributes are
copied from the received instances; type-2 ones a de-identified study lacks
(PatientName, PatientBirthDate...) are left empty, never invented, and so are values
that break their VR (a PatientBirthDate "1961-05-12"), with a warning that names the
attribute only. Every UID the report holds derives from (StudyInstanceUID, model
sha256, answer version): a rebuilt or re-sent answer is the same instance.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from ctedge.edge.serve.spool import uid_hash

log = logging.getLogger(__name__)

# Codes: SNOMED CT where one exists; the rest in ctedge's own (private) scheme.
SCHEME = "99CTEDGE"
TYPE2_FROM_EVIDENCE = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                       "StudyTime", "ReferringPhysicianName", "PatientID")

@dataclass(frozen=True)
class Algorithm:
    """What the SR says made the answer."""

    name: str
    version: str
    sha256: str
    threshold: float

def _codes():
    from pydicom.sr.coding import Code

    return {
        "procedure": Code("418023006", "SCT", "CT of chest"),
        "covid": Code("840539006", "SCT", "COVID-19"),
        "present": Code("52101004", "SCT", "Present"),
        "absent": Code("2667000", "SCT", "Absent"),
        "probability": Code("probability", SCHEME, "Probability of COVID-19"),
        "threshold": Code("threshold", SCHEME, "Decision threshold"),
        "slices": Code("slices-used", SCHEME, "Slices used"),
        "unit": Code("1", "UCUM", "no units"),
        "slice_unit": Code("{slices}", "UCUM", "slices"),
    }

def type2_problem(keyword: str, value) -> str | None:
    """Why a copied type-2 value can't go into a result (None: it can); never the value itself."""
    from pydicom import config
    from pydicom.datadict import dictionary_VR
    from pydicom.valuerep import DA, TM, validate_value

    if value is None or value == "":
        return None
    vr = dictionary_VR(keyword)
    try:
        validate_value(vr, value, config.RAISE)
        {"DA": DA, "TM": TM}.get(vr, str)(value)
    except (ValueError, TypeError, OverflowError):
        return f"not a valid {vr} value"
    if keyword == "PatientSex" and value not in ("M", "F", "O"):
        return "not M, F or O"
    return None


def copy_type2(source, target, study_uid: str, what: str) -> None:
    """``target`` gets ``source``'s type-2 patient/study attributes; absent or invalid ones empty
    (an invalid one with a warning naming the attribute, not its value)."""
    for keyword in TYPE2_FROM_EVIDENCE:
        value = source.get(keyword, None)
        problem = type2_problem(keyword, value)
        if problem is not None:
            log.warning("%s of study %s: %s is %s; left empty", what, uid_hash(study_uid), keyword, problem)
            value = None
        setattr(target, keyword, value)


def _evidence(datasets: list, study_uid: str) -> list:
    """Copies of the referenced slices' headers with absent or invalid type-2 attributes empty."""
    copies = []
    for index, ds in enumerate(datasets):
        ds = ds.copy()
        copy_type2(ds, ds, study_uid, "the SR" if index == 0 else "an SR reference")
        copies.append(ds)
    return copies


def derived_uid(kind: str, study_uid: str, algorithm: Algorithm, version: int) -> str:
    """A UID for one part of answer ``version`` (``kind``: sr, sr-series, tracking, sc...):
    the same for the same study, model and version, on any spool."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[f"ctedge-{kind}", study_uid, algorithm.sha256, str(version)])


def build_sr(result, evidence: list, algorithm: Algorithm, version: int, previous: bytes | None = None,
             incomplete: str | None = None):
    """The SR dataset for one answered study (``result``: a StudyResult without error);
    ``incomplete``: why the study may be incomplete (CompletionFlag PARTIAL)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.valuerep import DS  # from a string: NumericValue "54", not "54.0"

    c = _codes()
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version,
                                                  parameters=[f"model sha256 {algorithm.sha256}",
                                                              f"threshold {algorithm.threshold:g}"])
    positive = result.probability >= algorithm.threshold
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("tracking", result.study_uid, algorithm, version),
                                                     identifier="COVID-19 classification"),
        finding_type=c["covid"],
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(name=c["probability"], value=float(result.probability), unit=c["unit"],
                              algorithm_id=algorithm_id),
            hd.sr.Measurement(name=c["threshold"], value=float(algorithm.threshold), unit=c["unit"]),
            hd.sr.Measurement(name=c["slices"], value=DS(str(int(result.slices_used))), unit=c["slice_unit"]),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(c["covid"], c["present" if positive else "absent"])],
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                       for ds in evidence],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_device_uid(algorithm), name=algorithm.name, model_name=algorithm.version))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c["procedure"], imaging_measurements=[group])
    previous_versions = [pydicom.dcmread(io.BytesIO(previous))] if previous else None
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(evidence, result.study_uid), content=report[0],
        series_instance_uid=derived_uid("sr-series", result.study_uid, algorithm, version), series_number=9901,
        sop_instance_uid=derived_uid("sr", result.study_uid, algorithm, version), instance_number=version,
        manufacturer="ctedge", is_complete=incomplete is None, previous_versions=previous_versions)
    sr.SeriesDescription = f"ctedge COVID-19 result v{version}"
    if incomplete is not None:
        sr.CompletionFlagDescription = f"incomplete study: {incomplete}"[:64]  # LO
    return sr

def generate_device_uid(algorithm: Algorithm) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["ctedge-device", algorithm.sha256])

def sr_bytes(dataset) -> bytes:
    """The SR as a DICOM file (with its file meta), ready for the outbox."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

def read_sr(data) -> dict:
    """The values a reader (or a test) wants from an SR made by ``build_sr``."""
    import pydicom

    ds = data if isinstance(data, pydicom.Dataset) else pydicom.dcmread(io.BytesIO(data))
    out: dict = {"study_uid": str(ds.StudyInstanceUID), "patient_id": str(ds.get("PatientID", "")),
                 "sop_instance_uid": str(ds.SOPInstanceUID), "completion": str(ds.CompletionFlag),
                 "completion_reason": str(ds.get("CompletionFlagDescription", "")), "references": [],
                 "measurements": {}}

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "NUM":
                out["measurements"][name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE" and name == "COVID-19":
                out["finding"] = item.ConceptCodeSequence[0].CodeMeaning
            elif item.ValueType == "IMAGE":
                out["references"].append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return out
