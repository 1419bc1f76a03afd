"""DICOMweb out (``--destination dicomweb:URL``) against a stand-in DICOMweb server: the SR goes by
STOW-RS with a Content-Length and the token, and is marked sent only once it is known to have
arrived (the response lists it, or QIDO-RS finds it): a server that answers 200 and stores
nothing (Orthanc's pitfall with chunked bodies) is retried and counted failed, as for DIMSE."""

from __future__ import annotations

import json
import threading

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ctedge.core.phantom_studies import write_study
from ctedge.edge.serve.config import WebDestination, load_config
from ctedge.edge.serve.intake import read_header
from ctedge.edge.serve.sr import read_sr
from serve_fixtures import http_server, running_service, send_files, serve_model, study_files, wait_for

__all__ = ["serve_model"]


class StandIn:
    """A DICOMweb server that keeps what it is sent when ``honest``, and else answers 200 and
    keeps nothing; it records each request's headers."""

    def __init__(self, token: str):
        self.token, self.honest, self.stored, self.requests = token, threading.Event(), {}, []
        self.app = FastAPI()
        self.app.post("/dicom-web/studies")(self.stow)
        self.app.get("/dicom-web/studies/{study}/instances")(self.qido)

    async def stow(self, request: Request) -> Response:
        self.requests.append(dict(request.headers))
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return Response(status_code=401)
        body = await request.body()
        boundary = request.headers["content-type"].split("boundary=")[1].encode()
        part = body.split(b"--" + boundary)[1].split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
        if not self.honest.is_set():
            return Response(status_code=200)  # the pitfall: 200, nothing stored
        uid = str(read_header(part).SOPInstanceUID)
        self.stored[uid] = part
        answer = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}}]}}
        return Response(json.dumps(answer), media_type="application/dicom+json")

    def qido(self, study: str, SOPInstanceUID: str = "") -> Response:
        found = [{"00080018": {"vr": "UI", "Value": [SOPInstanceUID]}}] if SOPInstanceUID in self.stored else []
        return Response(json.dumps(found), media_type="application/dicom+json")


def test_an_sr_by_stow_rs_is_sent_only_once_it_arrived(tmp_path, serve_model):
    """While the server answers 200 and keeps nothing, the delivery fails with the reason (checked
    by QIDO-RS); once it keeps what it is sent, the retried SR is there and marked sent. Every
    request carried a Content-Length, no chunked encoding, and the token."""
    study_uid = write_study(tmp_path / "s", np.random.default_rng(95), True, slices=8, scout=False)
    server = StandIn("web-token")
    with http_server(server.app) as port:
        destination = WebDestination(f"http://127.0.0.1:{port}/dicom-web")
        with running_service(tmp_path, serve_model, destination=[destination], dicomweb_token="web-token",
                             retries=2, retry_seconds=0.05, retry_failed_every=0.3) as service:
            assert send_files(study_files(tmp_path / "s"), service.node.port) == [0] * 8
            failed = wait_for(lambda: (view := service.study_view(study_uid)[1]).get("delivery") == "failed" and view,
                              what="the delivery failed")
            server.honest.set()
            sent = wait_for(lambda: (view := service.study_view(study_uid)[1]).get("sent") and view, what="sent")
    [delivery] = failed["deliveries"]
    assert delivery["destination"] == f"dicomweb:http://127.0.0.1:{port}/dicom-web" and delivery["attempts"] == 2
    assert delivery["last_error"].startswith("STOW-RS answered HTTP 200 but the instance is not there")
    assert sent["deliveries"][0]["status"] == "sent" and list(server.stored) == [sent["sr_uid"]]
    assert read_sr(server.stored[sent["sr_uid"]])["study_uid"] == study_uid
    assert all("content-length" in r and "transfer-encoding" not in r for r in server.requests)
    assert {r["authorization"] for r in server.requests} == {"Bearer web-token"}


def test_dicomweb_destinations_and_poll_sources_are_checked_and_never_show_credentials(tmp_path, serve_model):
    """dicomweb:URL beside AET@HOST:PORT; its name (journal, views, logs) without the password in
    the URL; a malformed one or a poll source names what is wrong."""
    import pytest

    from ctedge.core.errors import CtedgeError

    config = load_config(None, {"model": serve_model, "destination": [
        "PACS@127.0.0.1:4242", "dicomweb:https://ai:s3cret@pacs.example/dicom-web/"],
        "poll": "dicomweb:http://127.0.0.1:8042/dicom-web"})
    assert [str(d) for d in config.destination] == ["PACS@127.0.0.1:4242", "dicomweb:https://pacs.example/dicom-web"]
    for bad, param in ((dict(destination=["dicomweb:ftp://u:pw@x/"]), "destination"),
                       (dict(poll="PACS@nowhere"), "poll"), (dict(poll_every=0), "poll_every"),
                       (dict(poll_since="2010-02-27"), "poll_since")):
        with pytest.raises(CtedgeError) as caught:
            load_config(None, {"model": serve_model, **bad})
        assert caught.value.param == param and "pw" not in str(caught.value)
