"""`ctedge serve` as an operator runs it (a subprocess): what it prints, how it stops, what it
says about a busy port."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import warnings
import zipfile

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pynetdicom import AE

from ctedge.core.errors import ExitCode
from ctedge.core.phantom_studies import write_study
from serve_fixtures import (
    CT_IMAGE_STORAGE,
    LOOPBACK,
    Collector,
    NodeProcess,
    free_port,
    send_files,
    serve_model,
    study_files,
    wait_for,
)

__all__ = ["serve_model"]
TOKEN = "t0ken-for-tests"
SENTINELS = {"PatientName": "SENTINELNAME^PHIGIVEN", "PatientID": "SENTINELPID77",
             "PatientBirthDate": "1961-05-12"}  # a malformed DA: pydicom and highdicom complain, quoting it


def _sentinel_study(folder) -> tuple[list, str, list[str]]:
    """A study whose patient attributes are sentinels, with odd values libraries warn about;
    its files, its StudyInstanceUID and every UID in it."""
    write_study(folder, np.random.default_rng(21), True, slices=10, scout=False)
    files, uids = study_files(folder), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            ds = pydicom.dcmread(path)
            ds["PatientName"] = DataElement("PatientName", "PN", SENTINELS["PatientName"])
            ds["PatientID"] = DataElement("PatientID", "LO", SENTINELS["PatientID"])
            ds["PatientBirthDate"] = DataElement("PatientBirthDate", "DA", SENTINELS["PatientBirthDate"])
            ds["StudyID"] = DataElement("StudyID", "SH", "SENTINEL-STUDY-ID-TOO-LONG")  # over SH's 16
            ds["PatientAge"] = DataElement("PatientAge", "AS", "SENTINELAGE")  # not an age string
            ds.save_as(path)
            uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    return files, str(ds.StudyInstanceUID), sorted(uids)


def _get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (INFO|WARNING|ERROR|CRITICAL) \S+: ")


def test_nothing_identifying_is_printed_or_shown(tmp_path, serve_model):
    """A study whose PatientName, PatientID, PatientBirthDate and UIDs are sentinels, with values
    pydicom and highdicom warn about (quoting them), sent over DICOM and uploaded over HTTP: none
    of the sentinels is on stdout, stderr or any page at default verbosity; every line printed
    is one log record with an ISO timestamp; the status page and /metrics need the token."""
    files, study_uid, uids = _sentinel_study(tmp_path / "study")
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as archive:
        for path in files:
            archive.write(path, path.name)
    collector = Collector().start()
    node = NodeProcess(serve_model, tmp_path / "spool", "--quiet-seconds", "0.3", "--token", TOKEN,
                       "--destination", str(collector.destination))
    try:
        node.start()
        assert send_files(files, node.dicom_port) == [0] * len(files)
        upload = urllib.request.Request(f"http://{LOOPBACK}:{node.http_port}/v1/studies",
                                        data=(tmp_path / "study.zip").read_bytes(),
                                        headers={"Authorization": f"Bearer {TOKEN}", "x-filename": "study.zip"})
        with urllib.request.urlopen(upload, timeout=60) as response:  # the API answers the client, PHI and all
            assert json.loads(response.read())["studies"][0]["patient_id"] == SENTINELS["PatientID"]
        wait_for(lambda: _get(node.http_port, f"/v1/studies/{study_uid}")[0] == 200, timeout=30,
                 what="the DICOM study's answer")
        assert [_get(node.http_port, page, token=None)[0] for page in ("/", "/metrics")] == [401, 401]
        pages = {page: _get(node.http_port, page) for page in ("/", "/metrics", "/readyz", "/healthz", "/v1/model",
                                                                "/docs", "/openapi.json")}
    finally:
        node.stop()
        collector.stop()
    assert node.process.returncode == 0
    assert all(status == 200 for status, _ in pages.values()), pages
    printed = node.log.read_text()
    for sentinel in [*SENTINELS.values(), "SENTINEL", "19610512", *uids]:
        assert sentinel not in printed, f"{sentinel} printed"
        assert not [page for page, (_, text) in pages.items() if sentinel in text], f"{sentinel} on a page"
    lines = printed.splitlines()
    assert lines and [line for line in lines if not ISO_LINE.match(line)] == []
    assert any("UserWarning from pydicom/" in line for line in lines)  # the library warnings: there, summarised


def test_sigterm_stops_accepting_finishes_what_is_in_flight_and_exits_0(tmp_path, serve_model):
    """SIGTERM while an association is sending: new connections are refused, the open association
    still stores the rest of its instances, then the node stops its loops and exits 0."""
    write_study(tmp_path / "study", np.random.default_rng(22), False, slices=6, scout=False)
    datasets = [pydicom.dcmread(path) for path in study_files(tmp_path / "study")]
    node = NodeProcess(serve_model, tmp_path / "spool", "--quiet-seconds", "60", "--drain-seconds", "20").start()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CT_IMAGE_STORAGE, str(datasets[0].file_meta.TransferSyntaxUID))
    assoc = ae.associate(LOOPBACK, node.dicom_port, ae_title="CTEDGE")
    try:
        assert assoc.is_established
        statuses = [assoc.send_c_store(ds).Status for ds in datasets[:3]]
        node.process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection((LOOPBACK, node.dicom_port), timeout=1).close()
                return False
            except (ConnectionRefusedError, ConnectionResetError):  # reset: queued as the listener closed
                return True

        wait_for(refused, timeout=10, what="the DICOM port closed")
        statuses += [assoc.send_c_store(ds).Status for ds in datasets[3:]]
        assoc.release()
        exit_code = node.process.wait(timeout=20)
    finally:
        assoc.release()
        node.stop()
    assert statuses == [0] * 6
    assert exit_code == 0
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 6
    printed = node.log.read_text()
    assert "stopping (SIGTERM): draining" in printed and printed.rstrip().endswith("stopped")


def test_a_busy_port_is_one_line_naming_it(tmp_path, serve_model):
    """The DICOM port taken: one line naming it, exit 2, before the model is loaded; the HTTP port
    goes through the same check (``listen``)."""
    from ctedge.core.errors import CtedgeError
    from ctedge.edge.serve.http import listen

    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "ctedge.cli", "serve", str(serve_model), "--dicom-port", str(port),
                               "--http-port", str(free_port()), "--spool", str(tmp_path / "spool")],
                              capture_output=True, text=True, timeout=120)
        with pytest.raises(CtedgeError) as refused:
            listen(LOOPBACK, port, "http_port")
    assert done.returncode == ExitCode.BAD_INPUT
    lines = (done.stdout + done.stderr).strip().splitlines()
    message = f"{port} on {LOOPBACK}: cannot listen (Address already in use); is another program using it?"
    assert lines == [f"error: --dicom-port {message}"], lines
    assert refused.value.with_name("--http-port") == f"--http-port {message}"
