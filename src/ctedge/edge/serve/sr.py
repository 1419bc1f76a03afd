"""The answer as a DICOM Comprehensive 3D SR (TID 1500 measurement report, highdicom).

The report holds the finding (COVID-19: Present or Absent), the patient probability,
the threshold, the number of slices used (an integer), the algorithm (name, version,
model sha256) and the top slices as referenced images, in the structure the open
viewers' TID 1500 loaders read (OHIF's cornerstone-dicom-sr, dwv): the root 126000
Imaging Measurement Report with template DCMR 1500, its 111028 Image Library (the top
slices), 126010 Imaging Measurements with one 125007 group holding the 112039/112040
tracking identifiers, and every NUM with content of its own (OHIF reads each NUM's
ContentSequence). The private coding scheme is declared (CodingSchemeIdentificationSequence). Patient and study attributes are
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

# Codes: SNOMED CT or DICOM where one exists; the rest in ctedge's own (private) scheme, declared in the SR.
SCHEME = "99CTEDGE"
SCHEME_NAME = "ctedge codes"
SCHEME_ORGANIZATION = "ctedge project"
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
        "probability": Code("122157", "DCM", "Probability"),  # of the group's finding, COVID-19
        "threshold": Code("122411", "DCM", "Threshold Value"),
        "slices": Code("slices-used", SCHEME, "Slices used"),  # DICOM has no code for it
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
        measurements=[  # each with the algorithm that made it (and so a ContentSequence, which OHIF reads)
            hd.sr.Measurement(name=c["probability"], value=float(result.probability), unit=c["unit"],
                              algorithm_id=algorithm_id),
            hd.sr.Measurement(name=c["threshold"], value=float(algorithm.threshold), unit=c["unit"],
                              algorithm_id=algorithm_id),
            hd.sr.Measurement(name=c["slices"], value=DS(str(int(result.slices_used))), unit=c["slice_unit"],
                              algorithm_id=algorithm_id),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(c["covid"], c["present" if positive else "absent"])],
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                       for ds in evidence],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_device_uid(algorithm), name=algorithm.name, model_name=algorithm.version))
    copies = _evidence(evidence, result.study_uid)
    library = _library_images(copies, result.study_uid)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c["procedure"], imaging_measurements=[group], referenced_images=library or None)
    if not library:
        _add_empty_library(report[0])
    previous_versions = [pydicom.dcmread(io.BytesIO(previous))] if previous else None
    sr = hd.sr.Comprehensive3DSR(
        evidence=copies, content=report[0],
        series_instance_uid=derived_uid("sr-series", result.study_uid, algorithm, version), series_number=9901,
        sop_instance_uid=derived_uid("sr", result.study_uid, algorithm, version), instance_number=version,
        manufacturer="ctedge", is_complete=incomplete is None, previous_versions=previous_versions)
    sr.SeriesDescription = f"ctedge COVID-19 result v{version}"
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    if incomplete is not None:
        sr.CompletionFlagDescription = f"incomplete study: {incomplete}"[:64]  # LO
    return sr

def _library_images(evidence: list, study_uid: str) -> list:
    """The referenced slices whose Image Library entry can be described (Rows, Columns,
    PixelSpacing, orientation and position: TID 1602/1604); another is left out, with a warning."""
    import highdicom as hd

    described = []
    for ds in evidence:
        try:
            hd.sr.ImageLibraryEntryDescriptors(ds)
        except Exception as exc:  # a header highdicom cannot describe: the SR goes without that entry
            log.warning("SR of study %s: a referenced slice left out of the Image Library (%s)", uid_hash(study_uid),
                        exc.__class__.__name__)
            continue
        described.append(ds)
    return described


def _add_empty_library(root) -> None:
    """An empty 111028 Image Library before Imaging Measurements: viewers look it up by name."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary,
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items = root.ContentSequence
    where = next(i for i, item in enumerate(items) if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    items.insert(where, library)


def _private_scheme():
    """The CodingSchemeIdentificationSequence item that declares ctedge's private codes."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator, item.CodingSchemeName = SCHEME, SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = SCHEME_ORGANIZATION
    return item


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

    for item in ds.ContentSequence:  # the Imaging Measurements (not the Image Library's descriptors)
        if item.ConceptNameCodeSequence[0].CodeValue == "126010":
            walk(item.ContentSequence)
    return out
