"""Results on their way out: an outage longer than the quick retries (failed, visible, tried
again until delivered), results with no destination, TLS to the destination."""

from __future__ import annotations

import shutil
import ssl

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pynetdicom import evt

from ctedge.core.phantom_studies import write_study
from ctedge.edge.serve.http import create_app
from serve_fixtures import Collector, running_service, send_files, serve_model, study_files, wait_for
from test_serve_dicom import _certificates

__all__ = ["serve_model"]


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_pacs_down_longer_than_the_quick_retries(tmp_path, serve_model):
    """The PACS is down: after ``retries`` quick tries the result is failed — counted by
    ctedge_results_failed, red on the status page, failed with its last error in
    /v1/studies/UID — and still tried every retry_failed_every; the PACS comes back and
    gets it. The same node with no destination shows its answers as such, never as sent."""
    study_uid = write_study(tmp_path / "s", np.random.default_rng(60), True, slices=8, scout=False)
    files = study_files(tmp_path / "s")
    collector = Collector()  # down
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination], quiet_seconds=0.1,
                             retries=2, retry_seconds=0.05, retry_failed_every=0.5) as service, \
                TestClient(create_app(service)) as client:
            assert send_files(files, service.node.port) == [0] * 8
            wait_for(lambda: client.get(f"/v1/studies/{study_uid}").json().get("delivery") == "failed",
                     what="the failed delivery")
            view = client.get(f"/v1/studies/{study_uid}").json()
            assert _metric(client.get("/metrics").text, "ctedge_results_failed") == 1
            page = client.get("/").text
            assert '<td class="failed">failed</td>' in page and "failed, tried again every 0.5 s" in page
            [delivery] = view["deliveries"]
            assert (delivery["status"], delivery["attempts"]) == ("failed", 2) and not view["sent"]
            assert delivery["last_error"] == "association failed (no answer or no connection)"
            collector.start()  # the PACS is back
            wait_for(lambda: client.get(f"/v1/studies/{study_uid}").json()["sent"], what="the result delivered")
            assert _metric(client.get("/metrics").text, "ctedge_results_failed") == 0
    finally:
        collector.stop()
    assert len(collector.received) == 1
    with running_service(tmp_path / "alone", serve_model, quiet_seconds=0.1) as service:
        assert send_files(files, service.node.port) == [0] * 8
        view = wait_for(lambda: service.study_view(study_uid)[1].get("result") and service.study_view(study_uid)[1],
                        what="the answer")
    assert (view["delivery"], view["sent"], view["deliveries"]) == ("no destination", False, [])


def test_tls_to_the_destination(tmp_path, serve_model):
    """--destination-tls-ca: the SR goes over TLS to a destination whose certificate that CA
    signed; a destination the CA did not sign gets nothing (the delivery says why)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not found")
    _certificates(tmp_path)
    study_uid = write_study(tmp_path / "s", np.random.default_rng(61), True, slices=8, scout=False)
    files = study_files(tmp_path / "s")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(tmp_path / "node.pem"), str(tmp_path / "node.key"))
    secure = Collector("SECURE")
    secure.server = secure.ae.start_server(("127.0.0.1", secure.port), block=False, ssl_context=server,
                                           evt_handlers=[(evt.EVT_C_STORE, secure._store)])
    try:
        with running_service(tmp_path, serve_model, destination=[secure.destination], quiet_seconds=0.1,
                             destination_tls_ca=tmp_path / "ca.pem") as service:
            assert send_files(files, service.node.port) == [0] * 8
            wait_for(lambda: service.study_view(study_uid)[1].get("sent"), what="the SR over TLS")
        (tmp_path / "other").mkdir()
        _certificates(tmp_path / "other")  # another CA
        with running_service(tmp_path / "other", serve_model, destination=[secure.destination], quiet_seconds=0.1,
                             retry_seconds=60, destination_tls_ca=tmp_path / "other" / "ca.pem") as service:
            assert send_files(files, service.node.port) == [0] * 8
            view = wait_for(lambda: (v := service.study_view(study_uid)[1]).get("deliveries") and
                            v["deliveries"][0]["attempts"] and v, what="the refused attempt")
    finally:
        secure.stop()
    assert len(secure.received) == 1 and view["deliveries"][0]["status"] == "pending"
    assert view["deliveries"][0]["last_error"].startswith("association failed")
