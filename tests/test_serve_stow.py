"""STOW-RS in (``POST /dicomweb/studies``): a DICOMweb client nobody here wrote (dicomweb-client)
stores a study and the SR comes back as for a DIMSE sender; hostile bodies get per-instance
failures or a 4xx, never a crash, and a body that breaks off leaves its study maybe incomplete."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from ctedge.core.phantom_studies import write_study
from ctedge.edge.runtime import Classifier
from ctedge.edge.serve.http import create_app
from ctedge.edge.serve.sr import read_sr
from ctedge.edge.study import StudyOptions, classify_study, find_studies
from serve_fixtures import Collector, http_server, running_service, serve_model, study_files, wait_for

__all__ = ["serve_model"]
TOKEN = "stow-token"
CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary={}'


def multipart(parts: list[bytes], boundary: str = "BOUNDARY", closed: bool = True) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
                    for part in parts)
    return body + (b"--" + boundary.encode() + b"--\r\n" if closed else b"")


def _post(client, body, boundary: str = "BOUNDARY", **headers):
    return client.post("/dicomweb/studies", content=body, headers={
        "content-type": CONTENT_TYPE.format(boundary), "authorization": f"Bearer {TOKEN}", **headers})


def test_a_dicomweb_client_stores_a_study_and_the_sr_comes_back(tmp_path, serve_model, caplog):
    """dicomweb-client's store_instances (chunked transfer encoding past its chunk size, as it
    sends large studies): every instance in ReferencedSOPSequence, the SR at the destination
    with classify_study's probability on the same files, the request a released association."""
    from dicomweb_client.api import DICOMwebClient

    study_uid = write_study(tmp_path / "study", np.random.default_rng(90), True, slices=10, patient_id="P-90")
    files = study_files(tmp_path / "study")
    expected = classify_study(Classifier(serve_model, runtime="onnxruntime"), find_studies(tmp_path / "study")[0],
                              StudyOptions())
    collector = Collector().start()
    caplog.set_level("INFO", logger="ctedge.edge.serve.stow")
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination], token=TOKEN) as service, \
                http_server(create_app(service)) as port:
            client = DICOMwebClient(f"http://127.0.0.1:{port}/dicomweb", headers={"Authorization": f"Bearer {TOKEN}"},
                                    chunk_size=64 << 10)
            answer = client.store_instances([pydicom.dcmread(f) for f in files])
            view = wait_for(lambda: (v := service.study_view(study_uid)[1]).get("sent") and v, what="the SR sent")
    finally:
        collector.stop()
    stored = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert stored == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files} and "FailedSOPSequence" not in answer
    assert view["instances"] == len(files) and view["completion"] == "COMPLETE"  # the scout is CT too: kept
    assert "STOW-RS from 127.0.0.1 released after" in caplog.text and f": {len(files)} stored (" in caplog.text
    sr = read_sr(collector.received[0])
    assert sr["study_uid"] == study_uid and abs(sr["measurements"]["Probability"] - expected.probability) <= 1e-6


@pytest.fixture()
def node(tmp_path, serve_model):
    with running_service(tmp_path, serve_model, token=TOKEN, max_instance_bytes=60_000,
                         max_study_bytes=2_000_000) as service, TestClient(create_app(service)) as client:
        yield service, client


def _instances(tmp_path, seed: int, slices: int = 8) -> tuple[str, list[bytes]]:
    uid = write_study(tmp_path / f"s{seed}", np.random.default_rng(seed), False, slices=slices, scout=False)
    return uid, [f.read_bytes() for f in study_files(tmp_path / f"s{seed}")]


def test_bad_requests_get_a_clear_4xx(tmp_path, node):
    """No token 401; another media type (or the metadata flavour) 415; an Accept without JSON 406;
    a declared or streamed body over --max-study-bytes 413; a boundary the body does not use,
    an empty body 400; nothing of them spooled."""
    service, client = node
    _, parts = _instances(tmp_path, 91, slices=2)
    body = multipart(parts)
    assert client.post("/dicomweb/studies", content=body,
                       headers={"content-type": CONTENT_TYPE.format("BOUNDARY")}).status_code == 401
    for content_type in ('multipart/related; type="application/dicom+json"; boundary=B', "application/dicom"):
        answer = client.post("/dicomweb/studies", content=body,
                             headers={"content-type": content_type, "authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 415 and "multipart/related" in answer.json()["detail"]
    assert _post(client, body, accept="application/dicom+xml").status_code == 406
    assert _post(client, body, **{"content-length": "3000000"}).status_code == 413
    streamed = _post(client, iter([multipart([b"\0" * 50_000] * 50)]))  # chunked: no Content-Length
    assert streamed.status_code == 413 and "over the limit" in streamed.json()["detail"]
    lying = _post(client, body, boundary="OTHER")
    assert lying.status_code == 400 and "boundary" in lying.json()["detail"]
    assert _post(client, b"").status_code == 400
    assert service.journal.value("SELECT COUNT(*) FROM instances") == 0


def test_bad_instances_are_per_instance_failures(tmp_path, node):
    """Among good instances: a part that is no DICOM (0xC000), one over --max-instance-bytes
    (0xA700, its UIDs echoed), a UID that breaks the UI rules (0xC000, not echoed), Enhanced CT
    (0x0122): 202, each failure in FailedSOPSequence and, in words, in a Warning header; the
    good ones stored, their study maybe incomplete (an instance got out-of-resources); all
    failing is 409."""
    service, client = node
    study_uid, good = _instances(tmp_path, 92, slices=3)
    big = pydicom.dcmread(io.BytesIO(good[0]))
    big.SOPInstanceUID, big.PixelData = "1.2.3.4.5.6", b"\0" * 70_000
    hostile, enhanced = (pydicom.dcmread(io.BytesIO(good[1])) for _ in range(2))
    hostile.StudyInstanceUID, hostile.SOPInstanceUID = "../../etc", "1.2.3.4.5.7"
    enhanced.SOPClassUID, enhanced.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2.1", "1.2.3.4.5.8"

    def encoded(ds) -> bytes:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    answer = _post(client, multipart([*good, b"not DICOM at all", encoded(big), encoded(hostile), encoded(enhanced)]))
    assert answer.status_code == 202 and answer.headers["content-type"] == "application/dicom+json"
    response = pydicom.Dataset.from_json(answer.json())
    reasons = [(item.ReferencedSOPInstanceUID, item.FailureReason) for item in response.FailedSOPSequence]
    assert reasons == [("", 0xC000), ("1.2.3.4.5.6", 0xA700), ("1.2.3.4.5.7", 0xC000), ("1.2.3.4.5.8", 0x0122)]
    assert len(response.ReferencedSOPSequence) == 3 and "RetrieveURL" in response
    warning = answer.headers["warning"]
    assert 'part 4: not a readable DICOM file' in warning and "over --max-instance-bytes 60000" in warning
    assert "StudyInstanceUID is not a UID" in warning and "Enhanced CT" in warning and "../" not in warning
    assert service.journal.value("SELECT COUNT(*) FROM instances") == 3
    assert service.journal.study(study_uid).association_state == "refused"  # as after a C-STORE's 0xA700
    assert _post(client, multipart([b"nothing"])).status_code == 409


def test_a_body_that_breaks_off_keeps_what_came_and_leaves_the_study_maybe_incomplete(tmp_path, node):
    """Two instances, then a part whose boundary never comes: 400, the two kept, the request an
    aborted association (the study waits as maybe incomplete, as after an aborted C-STORE)."""
    service, client = node
    study_uid, parts = _instances(tmp_path, 93, slices=3)
    body = multipart(parts[:2])[:-len(b"--BOUNDARY--\r\n")] + b"--BOUNDARY\r\n\r\n" + parts[2][:500]
    answer = _post(client, body)
    assert answer.status_code == 400 and "closing boundary" in answer.json()["detail"]
    assert service.journal.study(study_uid).instances == 2
    assert wait_for(lambda: service.study_view(study_uid)[1]["association"] == "aborted", what="aborted")
