"""Pulling from a PACS that misbehaves: small fake servers in the test (a DICOMweb service on
http.server, a DIMSE Q/R SCP on pynetdicom), loopback only, every stream bounded on both
sides, bounds and timeouts tiny. What is checked: nothing unbounded is read, nothing of
another study or patient is kept, a failing study is an error row while the others go on,
and every temp folder is removed.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.phantom_studies import fixed_uid, phantom_volume, write_series
from ctedge.edge.pacs import DicomWebSource, DimseSource, PullError, PullOptions, StudyRef, pull_studies
from ctedge.edge.runtime import Classifier
from ctedge.edge.study import predict_studies
from serve_fixtures import LOOPBACK, free_port

runner = CliRunner()
FAST = PullOptions(max_studies=100, max_bytes=256 << 10, timeout_s=0.5, deadline_s=1.0)
BOUNDARY = "ctedge-test-boundary"
STREAM_CAP = 64 << 20  # a fake server never sends more than this, whatever the client does


def tag(value, vr: str = "UI") -> dict:
    return {"vr": vr, "Value": [value]}


def study_entry(uid: str, patient: str = "P1") -> dict:
    return {"0020000D": tag(uid), "00100020": tag(patient, "LO"), "00080061": tag("CT", "CS")}


def series_entry(study_uid: str, series_uid: str, instances: int = 12) -> dict:
    return {"0020000D": tag(study_uid), "0020000E": tag(series_uid), "00080060": tag("CT", "CS"),
            "0008103E": tag("CHEST AXIAL", "LO"), "00201209": tag(instances, "IS")}


def multipart(files: list[Path], boundary: str = BOUNDARY) -> bytes:
    body = b""
    for file in files:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + file.read_bytes() + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


class FakeDicomWeb:
    """A DICOMweb stand-in: ``routes`` maps a path to a function(handler) that answers it."""

    def __init__(self):
        self.routes: dict = {}
        self.requests: list = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path, _, query = self.path.partition("?")
                fake.requests.append((path, query, dict(self.headers)))
                route = fake.routes.get(path.removeprefix("/dicom-web"))
                try:
                    if route is None:
                        self.send_error(404)
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):  # the client cut the stream off
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeDicomWeb()
    try:
        yield server
    finally:
        server.stop()


def answer(handler, body: bytes, content_type: str = "application/dicom+json", status: int = 200,
           length: int | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


def as_json(data) -> callable:
    body = json.dumps(data).encode()
    return lambda handler: answer(handler, body)


def endless(handler, start: bytes = b"", pause: float = 0.0) -> None:
    """A multipart response whose one part never ends (bounded here by STREAM_CAP)."""
    handler.send_response(200)
    handler.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
    handler.end_headers()
    handler.wfile.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + start)
    sent, chunk = 0, b"\0" * (1 if pause else 1 << 16)
    while sent < STREAM_CAP:
        handler.wfile.write(chunk)
        handler.wfile.flush()
        sent += len(chunk)
        if pause:
            time.sleep(pause)


def phantom_series(folder: Path, seed: int, study_uid: str | None = None, patient: str = "P1") -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    study_uid = study_uid or fixed_uid(rng)
    series_uid = fixed_uid(rng)
    write_series(folder, phantom_volume(rng, 12, 32), rng, study_uid=study_uid, series_uid=series_uid,
                 patient_id=patient)
    return study_uid, series_uid


# --- QIDO-RS -----------------------------------------------------------------------------

def test_a_qido_answer_of_100000_studies_is_refused_naming_the_limit(fake):
    fake.routes["/studies"] = as_json([{"0020000D": tag(f"1.2.{n}")} for n in range(100_000)])  # 4.5 MB
    with pytest.raises(PullError, match="matched 100,000 studies, more than --max-studies 100; narrow --query"):
        DicomWebSource(fake.url, options=FAST).find_studies({"ModalitiesInStudy": "CT"})
    assert "limit=101" in fake.requests[-1][1] and "ModalitiesInStudy=CT" in fake.requests[-1][1]
    fake.routes["/studies"] = lambda handler: answer(handler, b"[" + b" " * (9 << 20))  # 9 MiB, never closed
    with pytest.raises(PullError, match="QIDO-RS answer to /studies is larger than 8,388,608 bytes"):
        DicomWebSource(fake.url, options=FAST).find_studies({})


@pytest.mark.parametrize("entry, needle", [
    (study_entry("1.2.3/../../../admin"), "answered a StudyInstanceUID that is not a UID"),
    (study_entry("1." + "2" * 80), "answered a StudyInstanceUID that is not a UID"),
    ({"0020000D": {"vr": "UI"}}, "answered a StudyInstanceUID that is not a UID ('')"),
])
def test_uids_from_the_network_must_be_uids(fake, entry, needle):
    fake.routes["/studies"] = as_json([entry])
    with pytest.raises(PullError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        DicomWebSource(fake.url, options=FAST).find_studies({})


def test_a_series_list_of_another_study_is_refused(fake):
    fake.routes["/studies/1.2.3/series"] = as_json([series_entry("1.2.999", "1.2.3.4")])
    with pytest.raises(PullError, match="answered a series of another study .*the UIDs must match"):
        DicomWebSource(fake.url, options=FAST).find_series(StudyRef("1.2.3"))
    fake.routes["/studies/1.2.3/series"] = lambda handler: answer(handler, b"{not json")
    with pytest.raises(PullError, match="is not JSON"):
        DicomWebSource(fake.url, options=FAST).find_series(StudyRef("1.2.3"))


# --- WADO-RS -----------------------------------------------------------------------------

def fetch(fake, tmp_path, study: StudyRef = StudyRef("1.2.3", patient_id="P1"), series: str = "1.2.3.4",
          options: PullOptions = FAST) -> Path:
    folder = tmp_path / "into"
    folder.mkdir(exist_ok=True)
    DicomWebSource(fake.url, options=options).fetch_series(study, series, folder)
    return folder


def test_a_wado_response_that_never_ends_or_declares_too_much_is_cut_off(fake, tmp_path):
    fake.routes["/studies/1.2.3/series/1.2.3.4"] = endless
    started = time.monotonic()
    with pytest.raises(PullError, match="sent more than 262,144 bytes for series 1.2.3.4"):
        fetch(fake, tmp_path)
    assert time.monotonic() - started < 5
    fake.routes["/studies/1.2.3/series/1.2.3.4"] = lambda handler: answer(
        handler, b"", f"multipart/related; boundary={BOUNDARY}", length=10 << 30)
    with pytest.raises(PullError, match="declares 10,737,418,240 bytes, more than 262,144"):
        fetch(fake, tmp_path)
    fake.routes["/studies/1.2.3/series/1.2.3.4"] = lambda handler: endless(handler, pause=0.05)  # a trickle
    with pytest.raises(PullError, match="still sending after 1 s; cut off"):
        fetch(fake, tmp_path)
    fake.routes["/studies/1.2.3/series/1.2.3.4"] = lambda handler: time.sleep(2)  # no answer at all
    with pytest.raises(PullError, match="no answer to /studies/1.2.3/series/1.2.3.4 within 0.5 s"):
        fetch(fake, tmp_path)


def test_a_multipart_body_with_a_lying_boundary_is_refused(fake, tmp_path):
    _, _ = phantom_series(tmp_path / "files", 60, "1.2.3")
    files = sorted((tmp_path / "files").iterdir())[:2]
    route = "/studies/1.2.3/series/1.2.3.4"
    fake.routes[route] = lambda handler: answer(handler, multipart(files, "the-real-one"),
                                                f"multipart/related; boundary={BOUNDARY}")
    with pytest.raises(PullError, match="does not follow the boundary its Content-Type announced"):
        fetch(fake, tmp_path)
    body = multipart(files)
    fake.routes[route] = lambda handler: answer(handler, body[:len(body) // 2], f"multipart/related; boundary={BOUNDARY}")
    with pytest.raises(PullError, match="ended before its closing boundary"):
        fetch(fake, tmp_path)
    fake.routes[route] = lambda handler: answer(handler, body, "application/dicom")
    with pytest.raises(PullError, match="not multipart/related with a boundary"):
        fetch(fake, tmp_path)


def test_another_patients_study_for_the_uid_asked_is_refused(fake, tmp_path):
    """The PACS answers the UIDs asked for with another study's (another patient's) instances."""
    other_study, other_series = phantom_series(tmp_path / "other", 61, patient="SOMEONE-ELSE")
    files = sorted((tmp_path / "other").iterdir())
    fake.routes["/studies/1.2.3/series/1.2.3.4"] = lambda handler: answer(
        handler, multipart(files), f"multipart/related; boundary={BOUNDARY}")
    with pytest.raises(PullError, match=f"sent an instance of study '{other_study}'.*the UIDs must match"):
        fetch(fake, tmp_path)
    same_uids = f"/studies/{other_study}/series/{other_series}"  # the right UIDs, another patient
    fake.routes[same_uids] = fake.routes.pop("/studies/1.2.3/series/1.2.3.4")
    with pytest.raises(PullError, match="sent an instance of another patient"):
        fetch(fake, tmp_path, StudyRef(other_study, patient_id="P1"), other_series)


def test_over_dicomweb_a_failing_study_is_an_error_row_and_the_others_go_on(fake, tmp_path, model, monkeypatch):
    good, good_series = phantom_series(tmp_path / "good", 62)
    files = sorted((tmp_path / "good").iterdir())
    fake.routes["/studies"] = as_json([study_entry(good), study_entry("1.2.3"), study_entry("1.2.4")])
    fake.routes[f"/studies/{good}/series"] = as_json([series_entry(good, good_series)])
    fake.routes[f"/studies/{good}/series/{good_series}"] = lambda handler: answer(
        handler, multipart(files), f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
    fake.routes["/studies/1.2.3/series"] = as_json([series_entry("1.2.3", "1.2.3.4")])
    fake.routes["/studies/1.2.3/series/1.2.3.4"] = lambda handler: answer(handler, b"", status=500)
    fake.routes["/studies/1.2.4/series"] = endless  # not even the series list comes back whole
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    clf = Classifier(model)
    results = {r.study_uid: r for r in pull_studies(clf, DicomWebSource(fake.url, options=FAST), {})}
    assert results["1.2.3"].error.endswith("/studies/1.2.3/series/1.2.3.4: HTTP 500")
    assert "/studies/1.2.4/series" in results["1.2.4"].error
    expected = predict_studies(clf, [tmp_path / "good"])[0]
    assert results[good].probability == pytest.approx(expected.probability, abs=1e-6)
    assert not list(tmp_path.glob("ctedge-pull-*"))


def test_credentials_go_in_headers_and_never_into_messages(fake):
    def guarded(handler):
        if handler.headers.get("Authorization") not in ("Bearer s3cret", "Basic dXNlcjpzZWNyZXQ="):
            return answer(handler, b"", status=401)
        return as_json([])(handler)

    fake.routes["/studies"] = guarded
    assert DicomWebSource(fake.url, token="s3cret", options=FAST).find_studies({}) == []
    with_user = fake.url.replace("http://", "http://user:secret@")
    source = DicomWebSource(with_user, options=FAST)
    assert source.find_studies({}) == [] and "secret" not in source.name
    assert DicomWebSource(fake.url, user="user", password="secret", options=FAST).find_studies({}) == []
    with pytest.raises(PullError, match="HTTP 401, access refused") as refused:
        DicomWebSource(fake.url.replace("http://", "http://user:wrong@"), options=FAST).find_studies({})
    assert "wrong" not in str(refused.value)
    fake.routes["/studies"] = lambda handler: (handler.send_response(302), handler.send_header("Location", "http://x/"),
                                               handler.send_header("Content-Length", "0"), handler.end_headers())
    with pytest.raises(PullError, match="HTTP 302, a redirect .* is not followed"):
        DicomWebSource(fake.url, token="s3cret", options=FAST).find_studies({})


# --- DIMSE -------------------------------------------------------------------------------

class FakeQR:
    """A Q/R SCP stand-in (pynetdicom): C-FIND answers ``studies`` at study level and ``series``
    at series level; C-GET sends ``instances``, whatever was asked."""

    def __init__(self, studies: list, series: list, instances: list):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (
            CTImageStorage,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
        )

        self.studies, self.series, self.instances = studies, series, instances
        ae = AE(ae_title="FAKEPACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
        self.port = free_port()
        self.server = ae.start_server((LOOPBACK, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get)])
        self.peer = f"FAKEPACS@{LOOPBACK}:{self.port}"

    def _find(self, event):
        for ds in self.studies if event.identifier.QueryRetrieveLevel == "STUDY" else self.series:
            if event.is_cancelled:
                return
            yield 0xFF00, ds

    def _get(self, event):
        yield len(self.instances)
        for ds in self.instances:
            yield 0xFF00, ds

    def stop(self) -> None:
        self.server.shutdown()


def identifier(**values):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def test_dimse_a_query_matching_too_many_studies_is_refused(monkeypatch):
    from pynetdicom import _config

    monkeypatch.setattr(_config, "LOG_RESPONSE_IDENTIFIERS", False)  # as the CLI sets it: not logged, not parsed
    studies = [identifier(StudyInstanceUID=f"1.2.{n}", PatientID="P1") for n in range(150)]
    pacs = FakeQR(studies, [], [])
    try:
        with pytest.raises(PullError, match="matched more than 100 studies; narrow --query"):
            DimseSource(pacs.peer, options=FAST).find_studies({"ModalitiesInStudy": "CT"})
        with pytest.warns(UserWarning, match="Invalid value for VR UI"):  # pydicom, making the lie here
            lie = identifier(StudyInstanceUID="1.2.3/../x", PatientID="P1")
        bad = FakeQR([lie], [], [])
        with pytest.raises(PullError, match="answered a StudyInstanceUID that is not a UID"):
            DimseSource(bad.peer, options=FAST).find_studies({})
    finally:
        pacs.stop()
        bad.stop()


def test_dimse_another_patients_study_for_the_uid_asked_is_refused(tmp_path, model, monkeypatch):
    import pydicom

    other_study, other_series = phantom_series(tmp_path / "other", 63, patient="SOMEONE-ELSE")
    instances = [pydicom.dcmread(p) for p in sorted((tmp_path / "other").iterdir())]
    pacs = FakeQR([identifier(StudyInstanceUID="1.2.3", PatientID="P1", AccessionNumber="A1")],
                  [identifier(StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4", Modality="CT",
                              NumberOfSeriesRelatedInstances="12")], instances)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        result, = pull_studies(Classifier(model), DimseSource(pacs.peer, options=FAST), {})
    finally:
        pacs.stop()
    assert result.probability is None and result.accession_number == "A1"
    assert f"sent an instance of study '{other_study}'" in result.error and "the UIDs must match" in result.error
    assert not list(tmp_path.glob("ctedge-pull-*"))


# --- the command line ---------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--from-pacs", "PACS@h:104", "x/"], "--from-pacs/--from-dicomweb pull whole studies: give --study and no PATHS"),
    (["--study", "--from-pacs", "PACS@h:104", "--from-dicomweb", "http://h/"], "give one"),
    (["--study", "--from-pacs", "PACS:104"], "--from-pacs must be AET@HOST:PORT, not 'PACS:104'"),
    (["--study", "--from-pacs", "A-TITLE-LONGER-THAN-16@h:104"], "is not an AE title"),
    (["--study", "--from-pacs", "PACS@h:104", "--ae-title", "AN-AE-TITLE-TOO-LONG"], "--ae-title 'AN-AE-TITLE-TOO"),
    (["--study", "--from-pacs", "PACS@h:104", "--query", "Colour=red"], "--query 'Colour' is not a DICOM keyword"),
    (["--study", "--from-pacs", "PACS@h:104", "--query", "StudyDate"], "--query must be KEY=VALUE"),
    (["--study", "--from-dicomweb", "ftp://h/x"], "--from-dicomweb must be an http(s) URL"),
    (["--study", "--from-dicomweb", "http://u:p@h/x", "--dicomweb-token", "t"], "--dicomweb-token and basic auth (a user): give one"),
    (["--study"], "no PATHS given"),
])
def test_pull_options_are_checked_before_any_network(model, args, message):
    done = runner.invoke(app, ["predict", str(model), *args])
    assert done.exit_code == 2 and message in " ".join(done.output.split()), done.output


def test_dimse_one_huge_instance_is_cut_off_as_it_arrives(tmp_path):
    """An instance far above --max-bytes: the connection is closed once the budget is passed,
    not after the whole message is held in memory."""
    import pydicom

    study, series = phantom_series(tmp_path / "big", 64)
    huge = pydicom.dcmread(sorted((tmp_path / "big").iterdir())[0])
    huge.Rows = huge.Columns = 1536
    huge.PixelData = bytes(1536 * 1536 * 2)  # 4.5 MB
    pacs = FakeQR([], [], [huge])
    options = PullOptions(max_bytes=64 << 10, timeout_s=2, deadline_s=5)
    (tmp_path / "into").mkdir()
    try:
        with pytest.raises(PullError, match="sent more than 65,536 bytes for series .*; cut off"):
            DimseSource(pacs.peer, options=options).fetch_series(StudyRef(study, patient_id="P1"), series,
                                                                  tmp_path / "into")
    finally:
        pacs.stop()
