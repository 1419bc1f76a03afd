"""The answer as a DICOM Comprehensive 3D SR (TID 1500 measurement report, highdicom).

The report holds the finding (COVID-19 present or absent, with the threshold), the
patient probability, the number of slices used, the algorithm (name, version, model
sha256) and the top slices as referenced images. Patient and study attributes are
copied from the received instances; type-2 ones a de-identified study lacks
(PatientName, PatientBirthDate...) are left empty, never invented.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

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
        "finding": Code("121071", "DCM", "Finding"),
        "covid": Code("840539006", "SCT", "COVID-19"),
        "present": Code("52101004", "SCT", "Present"),
        "absent": Code("2667000", "SCT", "Absent"),
        "probability": Code("probability", SCHEME, "Probability of COVID-19"),
        "threshold": Code("threshold", SCHEME, "Decision threshold"),
        "slices": Code("slices-used", SCHEME, "Slices used"),
        "unit": Code("1", "UCUM", "no units"),
        "slice_unit": Code("{slices}", "UCUM", "slices"),
    }

def _evidence(datasets: list) -> list:
    """Copies of the referenced slices' headers with absent type-2 attributes set empty."""
    copies = []
    for ds in datasets:
        ds = ds.copy()
        for keyword in TYPE2_FROM_EVIDENCE:
            if keyword not in ds:
                setattr(ds, keyword, None)
        copies.append(ds)
    return copies

def sr_uids(key: str, version: int) -> tuple[str, str]:
    """Series and SOP instance UIDs derived from the study's spool key and the answer's
    version: rebuilding answer N after a crash gives the same instance, never a second one."""
    from pydicom.uid import generate_uid

    return (generate_uid(entropy_srcs=["ctedge-sr-series", key, str(version)]),
            generate_uid(entropy_srcs=["ctedge-sr", key, str(version)]))

def build_sr(result, evidence: list, algorithm: Algorithm, key: str, version: int, previous: bytes | None = None):
    """The SR dataset for one answered study (``result``: a StudyResult without error)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    c = _codes()
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version,
                                                  parameters=[f"model sha256 {algorithm.sha256}",
                                                              f"threshold {algorithm.threshold:g}"])
    positive = result.probability >= algorithm.threshold
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="COVID-19 classification"),
        finding_type=c["covid"],
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(name=c["probability"], value=float(result.probability), unit=c["unit"],
                              algorithm_id=algorithm_id),
            hd.sr.Measurement(name=c["threshold"], value=float(algorithm.threshold), unit=c["unit"]),
            hd.sr.Measurement(name=c["slices"], value=float(result.slices_used), unit=c["slice_unit"]),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(c["finding"], c["present" if positive else "absent"])],
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
    series_uid, sop_uid = sr_uids(key, version)
    previous_versions = [pydicom.dcmread(io.BytesIO(previous))] if previous else None
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(evidence), content=report[0], series_instance_uid=series_uid, series_number=9901,
        sop_instance_uid=sop_uid, instance_number=version, manufacturer="ctedge", is_complete=True,
        previous_versions=previous_versions)
    sr.SeriesDescription = f"ctedge COVID-19 result v{version}"
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
                 "sop_instance_uid": str(ds.SOPInstanceUID), "references": [], "measurements": {}}

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "NUM":
                out["measurements"][name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE" and name == "Finding":
                out["finding"] = item.ConceptCodeSequence[0].CodeMeaning
            elif item.ValueType == "IMAGE":
                out["references"].append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return out
