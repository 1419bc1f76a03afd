"""The HTTP side (FastAPI): classify uploads, look up DICOM answers, health, metrics, a status page.

Uploads are streamed once into a temp folder under the spool (a multipart body parsed as
it streams, only its field ``file`` kept), cut off at their limit (413) without being read
whole, refused while the disk is below ``--min-free-disk`` (507); classification runs on
the node's one worker (503 with Retry-After when its queue is full). The study answer is
the document `ctedge predict --study --json` writes, without server paths. With a token,
everything but /healthz, /readyz and the API docs needs it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import importlib.util
import logging
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from ctedge import __version__
from ctedge.core.errors import CtedgeError
from ctedge.core.files import printable
from ctedge.core.results import dumps
from ctedge.edge.runtime import predict_images
from ctedge.edge.serve import intake, stow
from ctedge.edge.serve.assembler import QueueFull
from ctedge.edge.serve.fhir import MEDIA_TYPE as FHIR_JSON
from ctedge.edge.serve.fhir import observation
from ctedge.edge.serve.pipeline import as_uploaded, classify_paths, study_document
from ctedge.edge.serve.spool import uid_hash
from ctedge.edge.serve.status import status_page
from ctedge.edge.study.nifti import NIFTI_EXTRA

CHUNK = 1 << 20
DISK_CHECK_EVERY = 16 << 20  # bytes written between two looks at the free disk
MAX_PART_HEADER = 8 << 10
RETRY_AFTER_S = 5
STUDY_SUFFIXES = ((b"PK\x03\x04", 0, ".zip"), (b"\x1f\x8b", 0, ".nii.gz"), (b"n+1\x00", 344, ".nii"),
                  (b"n+2\x00", 4, ".nii"))  # NIfTI-1 has its magic at byte 344, NIfTI-2 at byte 4
IMAGE_SUFFIXES = ((b"\x89PNG", 0, ".png"), (b"\xff\xd8", 0, ".jpg"), (b"DICM", 128, ".dcm"))
UPLOADS = "uploads"  # under the spool: one temp folder per upload, removed after its answer (and at start)
REALM = 'Bearer realm="ctedge serve", Basic realm="ctedge serve"'
log = logging.getLogger(__name__)


def listen(host: str, port: int, param: str) -> socket.socket:
    """A listening TCP socket on ``host:port``; a busy port is one CtedgeError naming it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise CtedgeError(f"{port} on {host}: cannot listen ({exc.strerror or exc}); is another program using "
                          "it?", param=param) from None
    return sock


def _json(data: dict, status: int = 200) -> Response:
    return Response(dumps(data), status_code=status, media_type="application/json")


def _check_disk(folder: Path, min_free: int, needed: int = 0) -> None:
    """507 when writing ``needed`` more bytes would take the disk below ``min_free``."""
    if shutil.disk_usage(folder).free - needed < min_free:
        raise HTTPException(507, "the node's disk is below its free-space minimum (--min-free-disk); try again "
                                 "later", headers={"Retry-After": str(RETRY_AFTER_S)})


class _Sink:
    """An upload's file: the body's size limit (413) and the disk minimum (507) checked as it comes."""

    def __init__(self, out, limit: int, folder: Path, min_free: int):
        self.out, self.limit, self.folder, self.min_free = out, limit, folder, min_free
        self.received = self.written = 0
        self.next_check = DISK_CHECK_EVERY

    def count(self, size: int) -> None:
        self.received += size
        if self.received > self.limit:
            raise HTTPException(413, f"request body is over the limit of {self.limit} bytes")

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.written += len(data)
        if self.written >= self.next_check:
            self.next_check += DISK_CHECK_EVERY
            _check_disk(self.folder, self.min_free)


class _FilePart:
    """python-multipart callbacks that write the field named ``file`` (the first one) into the
    sink as it streams by, and keep nothing else."""

    def __init__(self, sink: _Sink):
        self.sink, self.header, self.value, self.disposition = sink, b"", b"", b""
        self.writing, self.filename = False, None

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in ("on_part_begin", "on_header_field", "on_header_value",
                                                       "on_header_end", "on_headers_finished", "on_part_data",
                                                       "on_part_end")}

    def on_part_begin(self) -> None:
        self.disposition, self.writing = b"", False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]
        self._bounded()

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]
        self._bounded()

    def _bounded(self) -> None:
        if len(self.header) + len(self.value) > MAX_PART_HEADER:
            raise HTTPException(400, "a multipart header is over 8 KiB")

    def on_header_end(self) -> None:
        if self.header.strip().lower() == b"content-disposition":
            self.disposition = self.value
        self.header = self.value = b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        options = parse_options_header(self.disposition)[1]
        if options.get(b"name") == b"file" and self.filename is None:
            self.writing = True
            self.filename = printable(options.get(b"filename", b"file").decode("utf-8", "replace")) or "file"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.writing:
            self.sink.write(data[start:end])

    def on_part_end(self) -> None:
        self.writing = False


async def _receive(request: Request, sink: _Sink) -> str | None:
    """The body into the sink: as it is, or only its multipart field ``file``; that field's file name."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        async for chunk in request.stream():
            sink.count(len(chunk))
            sink.write(chunk)
        return None
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart request without a boundary")
    part = _FilePart(sink)
    try:
        parser = MultipartParser(boundary, part.callbacks())
        async for chunk in request.stream():
            sink.count(len(chunk))
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise HTTPException(400, f"not a readable multipart body ({exc.__class__.__name__})") from None
    if part.filename is None:
        raise HTTPException(400, "multipart request without a file field named 'file'")
    return part.filename


async def _upload(request: Request, config, folder: Path, limit: int, kinds, what: str) -> tuple[Path, str]:
    """The uploaded file (raw body, or multipart field ``file``) written once, under a suffix its
    content shows, and the name to show for it; 413 over ``limit``, 507 on a low disk, 400 naming
    it when it is none of ``kinds``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {limit}")
    _check_disk(folder, config.min_free_disk, int(declared) if declared and declared.isdigit() else 0)
    body = folder / "upload"
    with open(body, "wb") as out:
        filename = await _receive(request, _Sink(out, limit, folder, config.min_free_disk))
    name = filename or printable(request.headers.get("x-filename", "request body"))
    with open(body, "rb") as f:
        head = f.read(352)
    suffix = next((s for magic, at, s in kinds if head[at:at + len(magic)] == magic), None)
    if suffix is None:
        raise HTTPException(400, f"{name}: not {what}")
    if suffix in (".nii", ".nii.gz") and importlib.util.find_spec("nibabel") is None:
        raise HTTPException(501, f"{name}: this node cannot read NIfTI (nibabel is missing): {NIFTI_EXTRA} on the "
                                 "node")
    return body.rename(body.with_name("upload" + suffix)), name


def _without_paths(value, folder: Path, path: Path, name: str):
    """A document with the server's temp paths replaced by the upload's name (nested dicts, lists, strings)."""
    if isinstance(value, str):
        return value.replace(str(path), name).replace(str(folder) + "/", "").replace(str(folder), "")
    if isinstance(value, dict):
        return {key: _without_paths(item, folder, path, name) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_paths(item, folder, path, name) for item in value]
    return value


async def _on_worker(service, job):
    try:
        future = service.worker.submit(job)
    except QueueFull:
        raise HTTPException(503, "the work queue is full; try again later",
                            headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    return await asyncio.wrap_future(future)


def _token_given(authorization: str, token: str) -> bool:
    """``Bearer TOKEN``, or HTTP Basic with the token as password (a browser asks for it on the status page)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def create_app(service) -> FastAPI:
    """The FastAPI app of one running ``Service``."""
    config = service.config
    app = FastAPI(title="ctedge serve", version=__version__,
                  description="A chest-CT COVID-19 classifier as a DICOM node and an HTTP API.")

    def authorised(request: Request) -> None:
        if config.token is not None and not _token_given(request.headers.get("authorization", ""), config.token):
            raise HTTPException(401, "missing or wrong token (Authorization: Bearer TOKEN, or any user name with "
                                     "the token as password)", headers={"WWW-Authenticate": REALM})

    uploads = config.spool / UPLOADS
    shutil.rmtree(uploads, ignore_errors=True)  # a killed node's half uploads
    uploads.mkdir(parents=True, exist_ok=True)
    guarded = [Depends(authorised)]
    _classify_routes(app, service, guarded)
    _dicomweb_routes(app, service, guarded)
    _lookup_routes(app, service, guarded)
    return app


def _classify_routes(app: FastAPI, service, guarded: list) -> None:
    """POST /v1/studies and /v1/images: uploads classified on the worker."""
    config = service.config

    uploads = config.spool / UPLOADS

    @app.post("/v1/studies", dependencies=guarded, summary="Classify a study: a zip of DICOM files or NIfTI")
    async def post_study(request: Request) -> Response:
        with tempfile.TemporaryDirectory(prefix="study-", dir=uploads) as temp:
            folder = Path(temp)
            path, name = await _upload(request, config, folder, config.max_study_bytes, STUDY_SUFFIXES,
                                       "a zip of DICOM files or a NIfTI volume")
            results = await _on_worker(service, lambda: classify_paths(service.clf, [path], service.options))
            results = [as_uploaded(result, name) for result in results]
            if len(results) == 1 and results[0].error and not results[0].study_uid:
                raise HTTPException(400, _without_paths(f"{name}: {results[0].error}", folder, path, name))
            document = study_document(service.clf, config.model, service.options, results)
        service.metrics.http_requests.labels("studies").inc()
        return _json(_without_paths(document, folder, path, name))

    @app.post("/v1/images", dependencies=guarded, summary="Classify one image: PNG, JPEG or DICOM")
    async def post_image(request: Request) -> Response:
        with tempfile.TemporaryDirectory(prefix="image-", dir=uploads) as temp:
            folder = Path(temp)
            path, name = await _upload(request, config, folder, config.max_image_bytes, IMAGE_SUFFIXES,
                                       "a PNG, JPEG or DICOM image")
            document = await _on_worker(service, lambda: predict_images(service.clf, config.model, [path]))
        rows = tuple(replace(row, path=name) for row in document.predictions)
        if rows[0].error:
            raise HTTPException(400, _without_paths(f"{name}: {rows[0].error}", folder, path, name))
        service.metrics.http_requests.labels("images").inc()
        return _json(_without_paths(replace(document, predictions=rows).to_dict(), folder, path, name))

def _dicomweb_routes(app: FastAPI, service, guarded: list) -> None:
    """STOW-RS in: DICOM files into the spool and journal, as C-STORE brings them."""
    uploads = service.config.spool / UPLOADS

    @app.post("/dicomweb/studies", dependencies=guarded,
              summary="STOW-RS: store DICOM instances (multipart/related; type=\"application/dicom\")")
    async def store_instances(request: Request) -> Response:
        counts, state = stow.StowCounts(), "aborted"
        client = request.client.host if request.client else "?"
        folder = Path(tempfile.mkdtemp(prefix="stow-", dir=uploads))
        try:
            if not await stow.receive(request, service, folder, counts):
                raise HTTPException(400, "the multipart body ended before its closing boundary (truncated, or a "
                                         "boundary that does not match); the instances before it were kept")
            if not counts.outcomes:
                raise HTTPException(400, "the multipart body holds no part")
            refused = any(outcome.status == intake.OUT_OF_RESOURCES for _, outcome in counts.outcomes)
            state = "refused" if refused else "released"
            return stow.response(counts)
        except HTTPException as exc:
            if not counts.outcomes:
                log.warning("STOW-RS from %s refused (HTTP %d): %s", client, exc.status_code, exc.detail)
            raise
        finally:
            if any(outcome.status in (intake.SUCCESS, intake.DUPLICATE) for _, outcome in counts.outcomes):
                await asyncio.to_thread(service.spool.association_closed, counts.key, state)
            if counts.outcomes:
                stow.log_request(counts, client, state)
            shutil.rmtree(folder, ignore_errors=True)


def _lookup_routes(app: FastAPI, service, guarded: list) -> None:
    """Answers to DICOM studies, the model, health, metrics and the status page."""
    config = service.config

    @app.get("/v1/studies/{study_uid}", dependencies=guarded, summary="The answer to a study received over DICOM")
    def get_study(study_uid: str) -> Response:
        status, document = service.study_view(study_uid)
        if document is None:
            raise HTTPException(404, f"no study {uid_hash(study_uid)} (hashed) received")
        return _json(document, status)

    @app.get("/v1/studies/{study_uid}/fhir", dependencies=guarded,
             summary="The answer to a study received over DICOM as a FHIR R4 Observation")
    def get_study_fhir(study_uid: str) -> Response:
        status, document = service.study_view(study_uid)
        if document is None:
            raise HTTPException(404, f"no study {uid_hash(study_uid)} (hashed) received")
        if status != 200:  # still being received: no answer yet
            return _json(document, status)
        return Response(dumps(observation(document, service.algorithm, __version__)), media_type=FHIR_JSON)

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

    @app.get("/metrics", dependencies=guarded, summary="Prometheus metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, dependencies=guarded, summary="Status page")
    def index() -> str:
        return status_page(service, time.time())
