"""`ctedge serve`'s HTTP API (FastAPI's TestClient on a running node)."""

from __future__ import annotations

import json
import socket
import threading
import zipfile

import cv2
import numpy as np
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.phantom_studies import write_study
from ctedge.edge.serve.http import create_app
from ctedge.edge.serve.pipeline import classify_paths
from helpers import gray_image
from serve_fixtures import LOOPBACK, http_server, running_service, serve_model, study_files

__all__ = ["serve_model"]


def _zip_study(tmp_path, seed: int = 5) -> bytes:
    write_study(tmp_path / "study", np.random.default_rng(seed), True, slices=10)
    path = tmp_path / "study.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in study_files(tmp_path / "study"):
            archive.write(file, file.name)
    return path.read_bytes()


def _without_timings(document: dict) -> dict:
    """Timings aside, and paths relative to the input (the CLI's path, the upload's name)."""
    for study in document["studies"]:
        study.pop("timings_s")
        where = study.pop("input")
        for score in study["slices"] + study["top_slices"]:
            assert score["source"].startswith(where + ":")
            score["source"] = score["source"].removeprefix(where)
    return document


def test_post_study_is_predict_study_json(tmp_path, serve_model):
    """The same document as `ctedge predict --study --json` (timings and the input name aside),
    as a raw body and as a multipart field."""
    body = _zip_study(tmp_path)
    result = CliRunner().invoke(app, ["predict", str(serve_model), str(tmp_path / "study.zip"), "--study",
                                      "--runtime", "onnxruntime", "--json", str(tmp_path / "cli.json")])
    assert result.exit_code == 0, result.output
    expected = _without_timings(json.loads((tmp_path / "cli.json").read_text()))
    with running_service(tmp_path, serve_model) as service, TestClient(create_app(service)) as client:
        raw = client.post("/v1/studies", content=body, headers={"x-filename": "study.zip"})
        multipart = client.post("/v1/studies", files={"file": ("study.zip", body, "application/zip")})
    for response in (raw, multipart):
        assert response.status_code == 200, response.text
        document = response.json()
        assert document["studies"][0]["input"] == "study.zip"
        assert _without_timings(document) == expected


def test_token_limits_and_bad_uploads(tmp_path, serve_model):
    """401 without the bearer token; 413 for a body over the limit, cut off early; 400 naming
    a file that is no zip/NIfTI or no image; a PNG gets predict's row."""
    png = cv2.imencode(".png", gray_image(48))[1].tobytes()
    with running_service(tmp_path, serve_model, token="s3cret", max_study_bytes=4 << 20) as service, \
            TestClient(create_app(service)) as client:
        assert client.get("/v1/model").status_code == 401
        assert client.get("/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        model = client.get("/v1/model", headers=auth).json()
        assert model["threshold"] == 0.5 and model["runtime"] == "onnxruntime" and len(model["sha256"]) == 64
        too_big = client.post("/v1/studies", content=b"\0" * (5 << 20), headers=auth)
        assert too_big.status_code == 413
        declared = client.post("/v1/studies", content=b"x", headers=auth | {"Content-Length": str(5 << 20)})
        assert declared.status_code == 413
        bad_zip = client.post("/v1/studies", files={"file": ("scan.zip", b"PK\x03\x04 broken", "application/zip")},
                              headers=auth)
        assert bad_zip.status_code == 400 and "scan.zip" in bad_zip.json()["detail"]
        text = client.post("/v1/studies", files={"file": ("notes.txt", b"hello", "text/plain")}, headers=auth)
        assert text.status_code == 400 and "notes.txt" in text.json()["detail"]
        image = client.post("/v1/images", files={"file": ("slice.png", png, "image/png")}, headers=auth)
        assert image.status_code == 200, image.text
        row = image.json()["predictions"][0]
        assert row["path"] == "slice.png" and 0 <= row["probability"] <= 1 and row["error"] is None
        junk = client.post("/v1/images", content=b"\x89PNG not really", headers=auth | {"x-filename": "x.png"})
        assert junk.status_code == 400 and "x.png" in junk.json()["detail"]
        assert client.get("/healthz").json() == {"status": "ok"}  # probes need no token
        assert client.get("/readyz").status_code == 200
        for page in ("/", "/metrics"):  # they say what the node answered: the token, as for /v1
            refused = client.get(page)
            assert refused.status_code == 401 and "Basic" in refused.headers["WWW-Authenticate"]
        assert "ctedge_http_classifications_total" in client.get("/metrics", headers=auth).text
        assert "ctedge serve" in client.get("/", auth=("anyone", "s3cret")).text  # a browser's Basic prompt
        assert client.get("/", auth=("anyone", "wrong")).status_code == 401


def test_full_queue_answers_503_with_retry_after(tmp_path, serve_model):
    png = cv2.imencode(".png", gray_image(48))[1].tobytes()
    release = threading.Event()
    with running_service(tmp_path, serve_model, queue_size=1) as service, TestClient(create_app(service)) as client:
        busy = service.worker.submit(release.wait)  # the worker is busy...
        while not service.worker.busy:
            pass
        waiting = service.worker.submit(lambda: None)  # ...and its one queue place taken
        response = client.post("/v1/images", content=png)
        release.set()
        busy.result(timeout=10), waiting.result(timeout=10)
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert client.post("/v1/images", content=png).status_code == 200


def test_413_stops_reading_a_streamed_body(tmp_path, serve_model):
    """On a real server (uvicorn), a chunked upload of 10 GB is cut off after the limit:
    the sender is stopped long before it has sent the body."""
    with running_service(tmp_path, serve_model, max_study_bytes=1 << 20) as service, \
            http_server(create_app(service)) as port:
        chunk = b"100000\r\n" + b"\0" * (1 << 20) + b"\r\n"
        sent, reply = 0, b""
        with socket.create_connection((LOOPBACK, port), timeout=10) as s:
            s.sendall(b"POST /v1/studies HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                for sent in range(10_000):
                    s.sendall(chunk)
                    if sent % 8 == 0:
                        s.setblocking(False)
                        try:
                            reply += s.recv(4096)
                        except BlockingIOError:
                            pass
                        s.settimeout(10)
                    if reply:
                        break
            except OSError:  # the server closed the connection
                pass
            s.settimeout(2)
            try:
                reply += s.recv(4096)
            except OSError:
                pass
    assert sent < 100
    assert not reply or reply.startswith(b"HTTP/1.1 413")


def test_post_a_nifti_volume(tmp_path, serve_model):
    """A NIfTI volume (gzip) as the body: one study, its slices classified."""
    import nibabel

    from ctedge.core.phantom_studies import phantom_volume

    hu = phantom_volume(np.random.default_rng(12), 12, 64, positive=True)  # (slices, rows, cols)
    ras = np.transpose(hu[:, ::-1, ::-1], (2, 1, 0)).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(ras, np.diag([0.7, 0.7, 2.5, 1.0])), tmp_path / "ct.nii.gz")
    with running_service(tmp_path, serve_model) as service, TestClient(create_app(service)) as client:
        response = client.post("/v1/studies", files={"file": ("ct.nii.gz", (tmp_path / "ct.nii.gz").read_bytes())})
    assert response.status_code == 200, response.text
    study = response.json()["studies"][0]
    assert study["input"] == "ct.nii.gz" and study["slices_total"] == 12 and study["error"] is None


def test_uploads_are_written_once_within_the_disk_minimum_and_answer_without_server_paths(tmp_path, serve_model,
                                                                                        monkeypatch):
    """A multipart upload takes its size on disk once (under the spool, gone after the answer);
    below --min-free-disk an upload gets 507 before anything is written; no answer names a
    server path, a failed one included."""
    import ctedge.edge.serve.http as http

    body = _zip_study(tmp_path)
    seen = []

    def measured(clf, paths, options):  # what the upload holds on disk while it is classified
        seen.append(sum(p.stat().st_size for p in (tmp_path / "spool" / "uploads").rglob("*") if p.is_file()))
        return classify_paths(clf, paths, options)

    monkeypatch.setattr(http, "classify_paths", measured)
    with running_service(tmp_path, serve_model) as service, TestClient(create_app(service)) as client:
        multipart = client.post("/v1/studies", files={"file": ("study.zip", body, "application/zip")},
                                data={"note": "x" * 1000})
        broken = client.post("/v1/studies", files={"file": ("scan.zip", b"PK\x03\x04 broken", "application/zip")})
        junk_nifti = client.post("/v1/studies", content=b"\0" * 4 + b"n+2\0" + b"\0" * 600,
                                 headers={"x-filename": "junk.nii"})  # nibabel's error names the file it read
        service.config.min_free_disk = 1 << 60
        low = client.post("/v1/studies", content=body)
    assert multipart.status_code == 200, multipart.text
    assert seen[0] == len(body)  # once: not the body, then the part, then a spooled copy
    assert broken.status_code == 400 and "scan.zip" in broken.json()["detail"]
    assert low.status_code == 507 and "--min-free-disk" in low.json()["detail"]
    assert "junk.nii" in junk_nifti.json()["studies"][0]["error"]
    assert not list((tmp_path / "spool" / "uploads").iterdir())
    for response in (multipart, broken, junk_nifti, low):
        assert str(tmp_path) not in response.text, response.text


def test_nifti_2_is_recognised_and_a_node_without_nibabel_says_so(tmp_path, serve_model, monkeypatch):
    """An uncompressed NIfTI-2 volume (its magic at byte 4) is a study; without nibabel on the
    node a NIfTI upload gets 501 naming the extra, never 200 with an error inside."""
    import sys

    import nibabel

    from ctedge.core.phantom_studies import phantom_volume

    hu = phantom_volume(np.random.default_rng(12), 10, 48, positive=True)
    ras = np.transpose(hu[:, ::-1, ::-1], (2, 1, 0)).astype(np.int16)
    nibabel.save(nibabel.Nifti2Image(ras, np.diag([0.7, 0.7, 2.5, 1.0])), tmp_path / "ct.nii")
    volume = (tmp_path / "ct.nii").read_bytes()
    assert volume[4:8] == b"n+2\0"
    with running_service(tmp_path, serve_model) as service, TestClient(create_app(service)) as client:
        answered = client.post("/v1/studies", content=volume, headers={"x-filename": "ct.nii"})
        monkeypatch.setitem(sys.modules, "nibabel", None)  # as if not installed
        refused = client.post("/v1/studies", content=volume, headers={"x-filename": "ct.nii"})
    assert answered.status_code == 200, answered.text
    assert answered.json()["studies"][0]["slices_total"] == 10
    assert refused.status_code == 501 and 'pip install "ctedge[nifti]"' in refused.json()["detail"]
