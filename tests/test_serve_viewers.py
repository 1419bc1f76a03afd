"""The answer as the open viewers and FHIR apps read it: the SR through the steps of OHIF's
cornerstone-dicom-sr loader and dwv's TID 1500 check (each access that would throw in their
JavaScript raises here), its coding schemes declared, and ``GET /v1/studies/{uid}/fhir``
against the FHIR R4 Observation structure (fhirclient's R4 models, strict)."""

from __future__ import annotations

import numpy as np
import pytest

from ctedge.core.phantom_studies import write_study
from ctedge.edge.runtime import Classifier
from ctedge.edge.serve.pipeline import classify_spooled
from ctedge.edge.serve.sr import SCHEME, Algorithm, build_sr
from ctedge.edge.study import StudyOptions
from serve_fixtures import serve_model

__all__ = ["serve_model"]
ALGORITHM = Algorithm("ctedge test", "0.0", "ab" * 32, 0.5)
STANDARD_SCHEMES = {"DCM", "SCT", "UCUM", "RFC5646"}  # RFC5646: the language of the content


@pytest.fixture(scope="module")
def answer(tmp_path_factory, serve_model):
    folder = tmp_path_factory.mktemp("viewer-study")
    study_uid = write_study(folder, np.random.default_rng(80), True, slices=8, patient_id="P-80")
    return classify_spooled(Classifier(serve_model, runtime="onnxruntime"), folder, study_uid, StudyOptions())


def _code(item) -> str:
    """``item.ConceptNameCodeSequence.CodeValue`` as OHIF reads it: an item without one throws."""
    return item.ConceptNameCodeSequence[0].CodeValue


def ohif_load(sr) -> dict:
    """What OHIF's cornerstone-dicom-sr (getSopClassHandlerModule: _getDisplaySetsFromSeries,
    _getReferencedImagesList, _getMeasurements, _processNonGeometricallyDefinedMeasurement) reads."""
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000", "OHIF only shows TID 1500 measurement reports"
    content = sr.ContentSequence
    library = next(item for item in content if _code(item) == "111028")  # undefined.ContentSequence otherwise
    group = next((item for item in library.get("ContentSequence", []) if _code(item) == "126200"), None)
    images = [ref.ReferencedSOPInstanceUID for item in (group.ContentSequence if group else [])
              for ref in item.get("ReferencedSOPSequence", []) if "ReferencedSOPClassUID" in ref]
    measurements = next(item for item in content if _code(item) == "126010")
    measured = []
    for group in (item for item in measurements.ContentSequence if _code(item) == "125007"):
        items = group.ContentSequence
        tracking_uid = next(item for item in items if _code(item) == "112040").UID
        tracking_id = next(item for item in items if _code(item) == "112039").TextValue
        labels = {}
        for num in (item for item in items if item.ValueType == "NUM"):
            num.ContentSequence  # `const { ValueType } = ContentSequence` throws on a NUM without one
            value = num.MeasuredValueSequence[0]
            labels[num.ConceptNameCodeSequence[0].CodeMeaning] = (
                f"{float(value.NumericValue):.2f} {value.MeasurementUnitsCodeSequence[0].CodeValue}")
        measured.append({"TrackingUniqueIdentifier": tracking_uid, "TrackingIdentifier": tracking_id,
                         "labels": labels})
    return {"referencedImages": images, "measurements": measured}


def dwv_check(sr) -> list[str]:
    """dwv's AnnotationGroupFactory: a TID 1500 SR is one with template DCMR-1500 and root 126000;
    then an Imaging Measurements container (CONTAINS) of Measurement Groups (CONTAINS)."""
    template = sr.ContentTemplateSequence[0]
    assert f"{template.MappingResource}-{template.TemplateIdentifier}" == "DCMR-1500"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    container = next(item for item in sr.ContentSequence
                     if item.ValueType == "CONTAINER" and _code(item) == "126010" and item.RelationshipType == "CONTAINS")
    return [_code(item) for item in container.ContentSequence
            if item.ValueType == "CONTAINER" and item.RelationshipType == "CONTAINS"]


def test_the_sr_loads_as_ohif_and_dwv_read_tid_1500(answer):
    """The Image Library lists the top slices, the one measurement group carries both tracking
    identifiers, every NUM has the content OHIF destructures; dwv sees DCMR-1500."""
    sr = build_sr(answer.result, answer.evidence, ALGORITHM, 1)
    loaded = ohif_load(sr)
    top = [s.sop_instance_uid for s in answer.result.top_slices]
    assert loaded["referencedImages"] == top
    [group] = loaded["measurements"]
    assert group["TrackingIdentifier"] == "COVID-19 classification" and group["TrackingUniqueIdentifier"]
    assert group["labels"] == {"Probability": f"{answer.result.probability:.2f} 1", "Threshold Value": "0.50 1",
                               "Slices used": f"{answer.result.slices_used:.2f} {{slices}}"}
    assert dwv_check(sr) == ["125007"]


def test_a_slice_the_library_cannot_describe_leaves_the_library_empty_not_the_sr(answer, caplog):
    """A referenced slice without PixelSpacing: the SR is built, its Image Library empty (OHIF finds
    it and lists no image), and the warning names no value."""
    evidence = [ds.copy() for ds in answer.evidence]
    for ds in evidence:
        del ds.PixelSpacing
    sr = build_sr(answer.result, evidence, ALGORITHM, 1)
    assert ohif_load(sr)["referencedImages"] == []
    assert "left out of the Image Library (AttributeError)" in caplog.text


def test_every_coding_scheme_is_standard_or_declared(answer):
    """Codes come from DCM, SCT, UCUM and RFC 5646, and the one private code's scheme is declared in
    CodingSchemeIdentificationSequence."""
    sr = build_sr(answer.result, answer.evidence, ALGORITHM, 1)
    used = set()

    def walk(dataset):
        for element in dataset:
            if element.VR == "SQ" and element.keyword != "CodingSchemeIdentificationSequence":
                for item in element.value:
                    if "CodingSchemeDesignator" in item:
                        used.add(item.CodingSchemeDesignator)
                    walk(item)

    walk(sr)
    declared = {item.CodingSchemeDesignator: item for item in sr.CodingSchemeIdentificationSequence}
    assert used - STANDARD_SCHEMES == {SCHEME} and set(declared) == {SCHEME}
    assert declared[SCHEME].CodingSchemeName and declared[SCHEME].CodingSchemeResponsibleOrganization


def test_the_answer_as_a_fhir_r4_observation(tmp_path, serve_model):
    """``GET /v1/studies/{uid}/fhir``: a valid R4 Observation (fhirclient's models, strict: every
    key known, every type right, required ones present) with the finding and the probability as
    components, the algorithm as a contained Device, the study and the SR by DICOM UID; a study
    the rules refuse is a cancelled Observation that says why."""
    from fastapi.testclient import TestClient
    from fhirclient.models.observation import Observation

    from ctedge.core.phantom_studies import write_scout
    from ctedge.edge.serve.http import create_app
    from serve_fixtures import running_service, send_files, study_files, wait_for

    study_uid = write_study(tmp_path / "s", np.random.default_rng(81), True, slices=8, scout=False, patient_id="P-81")
    scout_uid = "1.2.826.0.1.3680043.10.1.81"
    write_scout(tmp_path / "scout", np.random.default_rng(82), scout_uid, "P-82")
    with running_service(tmp_path, serve_model) as service, TestClient(create_app(service)) as client:
        assert send_files(study_files(tmp_path / "s"), service.node.port) == [0] * 8
        assert send_files(study_files(tmp_path / "scout"), service.node.port) == [0] * 2
        view = wait_for(lambda: (v := client.get(f"/v1/studies/{study_uid}").json()).get("result") and v,
                        what="the answer")
        wait_for(lambda: client.get(f"/v1/studies/{scout_uid}").json().get("result"), what="the scout's answer")
        answered, refused = (client.get(f"/v1/studies/{uid}/fhir") for uid in (study_uid, scout_uid))
        missing = client.get("/v1/studies/1.2.3.4/fhir")
    assert answered.headers["content-type"] == "application/fhir+json" and missing.status_code == 404
    document = answered.json()
    parsed = Observation(document, strict=True)
    assert parsed.status == "final" and parsed.code.coding[0].code == "840539006"
    components = {c.code.coding[0].display: c for c in parsed.component}
    result = view["result"]
    assert components["COVID-19"].valueCodeableConcept.coding[0].display == (
        "Present" if result["probability"] >= 0.5 else "Absent")
    assert components["Probability"].valueQuantity.value == pytest.approx(result["probability"])
    assert components["Slices used"].valueInteger == result["slices_used"]
    assert parsed.device.reference == "#algorithm" and parsed.contained[0].resource_type == "Device"
    assert parsed.partOf[0].identifier.value == f"urn:oid:{study_uid}"
    assert parsed.derivedFrom[0].identifier.value == f"urn:oid:{view['sr_uid']}"
    assert parsed.subject.identifier.value == "P-81"
    cancelled = Observation(refused.json(), strict=True)
    assert cancelled.status == "cancelled" and cancelled.component is None
    assert cancelled.dataAbsentReason.coding[0].code == "not-applicable"
    assert cancelled.dataAbsentReason.text.startswith("not eligible: no series meets the rules")
