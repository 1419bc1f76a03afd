"""The HTTP side (FastAPI): classify uploads, look up DICOM answers, health, metrics, a status page.

Uploads are streamed to a temp file and cut off at their limit (413) without being read
whole; classification runs on the node's one worker (503 with Retry-After when its queue
is full). The study answer is the document `ctedge predict --study --json` writes.
"""

from __future__ import annotations

import asyncio
import hmac
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from ctedge import __version__
from ctedge.core.results import dumps
from ctedge.edge.runtime import predict_images
from ctedge.edge.serve.assembler import QueueFull
from ctedge.edge.serve.pipeline import as_uploaded, classify_paths, study_document
from ctedge.edge.serve.spool import uid_hash
from ctedge.edge.serve.status import status_page

CHUNK = 1 << 20
RETRY_AFTER_S = 5
STUDY_SUFFIXES = ((b"PK\x03\x04", 0, ".zip"), (b"\x1f\x8b", 0, ".nii.gz"), (b"n+1\x00", 344, ".nii"),
                  (b"n+2\x00", 344, ".nii"))
IMAGE_SUFFIXES = ((b"\x89PNG", 0, ".png"), (b"\xff\xd8", 0, ".jpg"), (b"DICM", 128, ".dcm"))


def _json(data: dict, status: int = 200) -> Response:
    return Response(dumps(data), status_code=status, media_type="application/json")


async def _stream_to_file(request: Request, limit: int, folder: Path) -> Path:
    """The raw body in a temp file; 413 as soon as it passes ``limit`` (or says it will)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {limit}")
    path, size = folder / "body", 0
    with open(path, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            f.write(chunk)
    return path


async def _upload(request: Request, limit: int, folder: Path, kinds, what: str) -> tuple[Path, str]:
    """The uploaded file (raw body, or multipart field ``file``) under a suffix its content
    shows, and the name to show for it; 400 naming it when it is none of ``kinds``."""
    body = await _stream_to_file(request, limit, folder)
    name = request.headers.get("x-filename", "request body")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async def receive(stream=open(body, "rb")):
            chunk = stream.read(CHUNK)
            more = len(chunk) == CHUNK
            if not more:
                stream.close()
            return {"type": "http.request", "body": chunk, "more_body": more}

        form = await Request(request.scope, receive).form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "multipart request without a file field named 'file'")
        name = upload.filename or "file"
        body = folder / "part"
        with open(body, "wb") as f:
            while chunk := await upload.read(CHUNK):
                f.write(chunk)
        await form.close()
    with open(body, "rb") as f:
        head = f.read(352)
    suffix = next((s for magic, at, s in kinds if head[at:at + len(magic)] == magic), None)
    if suffix is None:
        raise HTTPException(400, f"{name}: not {what}")
    return body.rename(body.with_name("upload" + suffix)), name


async def _on_worker(service, job):
    try:
        future = service.worker.submit(job)
    except QueueFull:
        raise HTTPException(503, "the work queue is full; try again later",
                            headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    return await asyncio.wrap_future(future)


def create_app(service) -> FastAPI:
    """The FastAPI app of one running ``Service``."""
    config = service.config
    app = FastAPI(title="ctedge serve", version=__version__,
                  description="A chest-CT COVID-19 classifier as a DICOM node and an HTTP API.")

    def authorised(request: Request) -> None:
        if config.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorised)]
    _classify_routes(app, service, guarded)
    _lookup_routes(app, service, guarded)
    return app


def _classify_routes(app: FastAPI, service, guarded: list) -> None:
    """POST /v1/studies and /v1/images: uploads classified on the worker."""
    config = service.config

    @app.post("/v1/studies", dependencies=guarded, summary="Classify a study: a zip of DICOM files or NIfTI")
    async def post_study(request: Request) -> Response:
        with tempfile.TemporaryDirectory(prefix="ctedge-upload-") as folder:
            path, name = await _upload(request, config.max_study_bytes, Path(folder), STUDY_SUFFIXES,
                                       "a zip of DICOM files or a NIfTI volume")
            results = await _on_worker(service, lambda: classify_paths(service.clf, [path], service.options))
        results = [as_uploaded(result, name) for result in results]
        if len(results) == 1 and results[0].error and not results[0].study_uid:
            raise HTTPException(400, f"{name}: {results[0].error}")
        service.metrics.http_requests.labels("studies").inc()
        return _json(study_document(service.clf, config.model, service.options, results))

    @app.post("/v1/images", dependencies=guarded, summary="Classify one image: PNG, JPEG or DICOM")
    async def post_image(request: Request) -> Response:
        with tempfile.TemporaryDirectory(prefix="ctedge-upload-") as folder:
            path, name = await _upload(request, config.max_image_bytes, Path(folder), IMAGE_SUFFIXES,
                                       "a PNG, JPEG or DICOM image")
            document = await _on_worker(service, lambda: predict_images(service.clf, config.model, [path]))
        rows = tuple(replace(row, path=name) for row in document.predictions)
        if rows[0].error:
            raise HTTPException(400, f"{name}: {rows[0].error}")
        service.metrics.http_requests.labels("images").inc()
        return _json(replace(document, predictions=rows).to_dict())

def _lookup_routes(app: FastAPI, service, guarded: list) -> None:
    """Answers to DICOM studies, the model, health, metrics and the status page."""
    config = service.config

    @app.get("/v1/studies/{study_uid}", dependencies=guarded, summary="The answer to a study received over DICOM")
    def get_study(study_uid: str) -> Response:
        status, document = service.study_view(study_uid)
        if document is None:
            raise HTTPException(404, f"no study {uid_hash(study_uid)} (hashed) received")
        return _json(document, status)

    @app.get("/v1/model", dependencies=guarded, summary="The model and the runtime it runs on")
    def get_model() -> Response:
        clf = service.clf
        return _json({"path": str(config.model), "sha256": service.algorithm.sha256, "runtime": clf.runtime,
                      "precision": clf.precision, "providers": clf.providers, "input_size": clf.size,
                      "classes": clf.classes, "positive": clf.positive, "threshold": clf.threshold,
                      "window": list(clf.window), "metadata": dict(clf.metadata), "ctedge_version": __version__})

    @app.get("/healthz", summary="The process answers")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="The node takes and answers studies: its loops, the disk, a pause, the last error")
    def readyz() -> Response:
        ready, document = service.readiness()
        return _json(document, 200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, summary="Status page")
    def index() -> str:
        return status_page(service, time.time())
