"""The answer as a FHIR R4 Observation (``GET /v1/studies/{uid}/fhir``), for apps that speak FHIR.

It follows HL7's DICOM SR to FHIR mapping (http://hl7.org/fhir/uv/dicom-sr, its Imaging
Measurement Group profile) for the SR's one measurement group, in R4's shape: category
imaging and DCM 125007; the group's finding type (COVID-19) as ``code``; the qualitative
evaluation (Present/Absent), the probability, the threshold and the slices used as
``component``s, coded as in the SR; the tracking UID as ``identifier``; the study as
``partOf`` and the SR as ``derivedFrom`` (by DICOM UID); the algorithm as a contained
``Device`` referenced by ``device``. A study without an answer (not eligible, an error) is
an Observation with status ``cancelled`` and a ``dataAbsentReason``.
"""

from __future__ import annotations

import datetime

from ctedge.edge.serve.spool import uid_hash
from ctedge.edge.serve.sr import SCHEME, Algorithm, derived_uid, generate_device_uid

DICOM_UID = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
CTEDGE_CODES = f"urn:ctedge:codes:{SCHEME}"  # the SR's private scheme
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
MEDIA_TYPE = "application/fhir+json"


def _coding(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}]}


def _uid(uid: str) -> dict:
    return {"system": DICOM_UID, "value": f"urn:oid:{uid}"}


def _ratio(value: float) -> dict:
    return {"value": value, "unit": "no units", "system": UCUM, "code": "1"}


def _status(view: dict, result: dict) -> str:
    if result.get("error") or result.get("not_eligible"):
        return "cancelled"
    if view["completion"] == "PARTIAL":
        return "preliminary"
    return "amended" if view["version"] > 1 else "final"


def _device(algorithm: Algorithm, version: str) -> dict:
    return {"resourceType": "Device", "id": "algorithm", "identifier": [_uid(generate_device_uid(algorithm))],
            "manufacturer": "ctedge", "deviceName": [{"name": algorithm.name, "type": "model-name"}],
            "version": [{"type": {"text": "ctedge"}, "value": version},
                        {"type": {"text": "model sha256"}, "value": algorithm.sha256}]}


def _components(result: dict, threshold: float) -> list[dict]:
    positive = result["probability"] >= threshold
    return [
        {"code": _coding(SCT, "840539006", "COVID-19"),
         "valueCodeableConcept": _coding(SCT, "52101004", "Present") if positive else
         _coding(SCT, "2667000", "Absent")},
        {"code": _coding(DCM, "122157", "Probability"), "valueQuantity": _ratio(result["probability"])},
        {"code": _coding(DCM, "122411", "Threshold Value"), "valueQuantity": _ratio(threshold)},
        {"code": _coding(CTEDGE_CODES, "slices-used", "Slices used"), "valueInteger": int(result["slices_used"])},
    ]


def observation(view: dict, algorithm: Algorithm, ctedge_version: str) -> dict:
    """The Observation for one answered study (``view``: ``views.study_view``'s document)."""
    result, study_uid, version = view["result"], view["study_uid"], view["version"]
    document = {
        "resourceType": "Observation", "id": f"ctedge-{uid_hash(study_uid)}-v{version}",
        "contained": [_device(algorithm, ctedge_version)],
        "status": _status(view, result),
        "category": [_coding(CATEGORY, "imaging", "Imaging"), _coding(DCM, "125007", "Measurement Group")],
        "code": {**_coding(SCT, "840539006", "COVID-19"), "text": "COVID-19 on chest CT"},
        "partOf": [{"type": "ImagingStudy", "identifier": _uid(study_uid)}],
        "issued": datetime.datetime.fromtimestamp(view["answered_at"], datetime.timezone.utc).isoformat(
            timespec="milliseconds"),
        "device": {"reference": "#algorithm", "display": algorithm.name},
    }
    if result.get("patient_id"):
        document["subject"] = {"type": "Patient", "identifier": {"value": result["patient_id"]}}
    if view["completion_reason"]:
        document["note"] = [{"text": f"incomplete study: {view['completion_reason']}"}]
    if document["status"] == "cancelled":
        reason = result.get("error") or f"not eligible: {result['not_eligible']}"
        document["dataAbsentReason"] = {**_coding(ABSENT, "error" if result.get("error") else "not-applicable",
                                                  "Error" if result.get("error") else "Not Applicable"),
                                        "text": reason}
        return document
    document["identifier"] = [_uid(derived_uid("tracking", study_uid, algorithm, version))]
    if view["sr_uid"]:
        document["derivedFrom"] = [{"type": "DocumentReference", "identifier": _uid(view["sr_uid"]),
                                    "display": "DICOM SR (TID 1500)"}]
    document["component"] = _components(result, algorithm.threshold)
    return document
