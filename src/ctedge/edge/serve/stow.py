"""STOW-RS in: ``POST /dicomweb/studies`` (PS3.18 10.5), into the same spool and journal as
C-STORE, through the same checks (``intake``).

The body (``multipart/related; type="application/dicom"``) is parsed as it streams
(python-multipart): each part is written to its own file under the spool, at most
``--max-instance-bytes`` of it kept, then spooled like one C-STORE; the whole body is cut
off at ``--max-study-bytes`` (413). A request is like one association: a body that ends
properly releases it (or leaves it "refused" when an instance got out-of-resources), one
that breaks off (a lying boundary, a truncated body, a client gone) aborts it, so its
studies wait as maybe incomplete. The answer is the Store Instances Response (PS3.18
Annex I) as DICOM JSON: ReferencedSOPSequence, FailedSOPSequence with FailureReason,
RetrieveURL empty (this node does not serve WADO-RS); 200 when every instance was kept,
202 when some failed, 409 when all did; each failure also in a ``Warning`` header, in words.
"""

from __future__ import annotations

import asyncio
import email.message
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import Response

from ctedge.core.files import printable
from ctedge.core.results import dumps
from ctedge.edge.serve import intake
from ctedge.edge.serve.intake import Outcome

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
MAX_PART_HEADER = 8 << 10
MAX_BOUNDARY = 200  # RFC 2046 says 70; Orthanc's STOW-RS client sends 73
MAX_WARNINGS = 20  # Warning header lines in one answer
RETRY_AFTER_S = 5


@dataclass
class _Part:
    """One part of the body, written to its file (at most ``limit`` bytes of it)."""

    number: int
    path: Path
    file: object
    limit: int
    content_type: bytes = b""
    size: int = 0
    header_bytes: int = 0

    @property
    def over(self) -> bool:
        return self.size > self.limit


@dataclass
class StowCounts:
    """What one request brought (its log line and its answer)."""

    key: str = field(default_factory=lambda: f"stow-{uuid.uuid4().hex}")  # the journal's name for it
    started: float = field(default_factory=time.monotonic)
    outcomes: list[tuple[int, Outcome]] = field(default_factory=list)  # (part number, outcome)
    bytes: int = 0


class _Body:
    """python-multipart callbacks writing each part to a file (at most ``limit`` bytes of it),
    and the parts that ended, for the request to spool."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.part: _Part | None = None
        self.ended: list[_Part] = []
        self.count, self.finished = 0, False
        self.header = self.value = b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._value,
                "on_header_end": self._header_end, "on_part_data": self._data, "on_part_end": self._end,
                "on_end": self._done}

    def _begin(self) -> None:
        self.count += 1
        path = self.folder / f"part-{self.count:06d}"
        self.part = _Part(self.count, path, open(path, "wb"), self.limit)

    def _field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]
        self._bounded(end - start)

    def _value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]
        self._bounded(end - start)

    def _bounded(self, size: int) -> None:
        self.part.header_bytes += size
        if self.part.header_bytes > MAX_PART_HEADER:
            raise HTTPException(400, f"part {self.part.number}: its headers are over 8 KiB")

    def _header_end(self) -> None:
        if self.header.strip().lower() == b"content-type":
            self.part.content_type = self.value.strip()
        self.header = self.value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        keep = min(end, start + max(0, part.limit - part.size))
        if keep > start:  # past the limit the part is counted, not kept
            part.file.write(data[start:keep])
        part.size += end - start

    def _end(self) -> None:
        self.part.file.close()
        self.ended.append(self.part)
        self.part = None

    def _done(self) -> None:
        self.finished = True

    def close(self) -> None:
        if self.part is not None:
            self.part.file.close()


def _media_type(value: str) -> tuple[str, dict]:
    message = email.message.Message()
    message["content-type"] = value
    return message.get_content_type(), dict(message.get_params()[1:])


def check_request(request: Request, config, spool) -> bytes:
    """The body's boundary, once the request may be read: 415 for another media type, 406 for an
    Accept without DICOM JSON, 413 for a declared body over the limit, 503 on a low disk or a pause."""
    content_type = request.headers.get("content-type", "")
    media, params = _media_type(content_type)
    kind = params.get("type", "application/dicom").lower()
    if media != "multipart/related" or kind != "application/dicom":
        raise HTTPException(415, f"STOW-RS here takes multipart/related; type=\"application/dicom\" (DICOM files), "
                                 f"not {printable(content_type)[:120]!r}")
    accept = request.headers.get("accept", "")
    if accept and not any(word in accept for word in ("json", "*/*", "application/*")):
        raise HTTPException(406, f"the answer is {DICOM_JSON}, which Accept {printable(accept)[:80]!r} excludes")
    boundary = params.get("boundary", "")
    if not 0 < len(boundary) <= MAX_BOUNDARY:
        raise HTTPException(400, f"multipart/related without a boundary (1-{MAX_BOUNDARY} characters)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > config.max_study_bytes:
        raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {config.max_study_bytes} "
                                 "(--max-study-bytes); send the study in several requests")
    if spool.pause.paused or spool.free_bytes() < config.min_free_disk:
        raise HTTPException(503, "the node's disk is full or below --min-free-disk: nothing is stored now; try again "
                                 "later", headers={"Retry-After": str(RETRY_AFTER_S)})
    return boundary.encode("latin-1", "replace")


def _spool_part(spool, part: _Part, association: str) -> Outcome:
    """One ended part into the spool like one C-STORE (its file is moved there when kept)."""
    media = part.content_type.split(b";")[0].strip().lower()
    if media not in (b"", b"application/dicom"):
        return Outcome(intake.CANNOT_UNDERSTAND, f"part {part.number}: Content-Type "
                       f"{printable(media.decode('latin-1'))[:60]}, not application/dicom")
    try:
        header = intake.read_header(part.path)
    except Exception as exc:  # not DICOM, or damaged
        return Outcome(intake.CANNOT_UNDERSTAND, f"part {part.number}: not a readable DICOM file "
                       f"({exc.__class__.__name__})")
    sop_class = str(header.get("SOPClassUID", ""))
    echo = dict(sop_class=intake.echoed(sop_class), sop_uid=intake.echoed(str(header.get("SOPInstanceUID", ""))))
    if part.over:
        return Outcome(intake.OUT_OF_RESOURCES, f"part {part.number}: an instance of {part.size} bytes, over "
                       f"--max-instance-bytes {part.limit}", **echo)
    decided = intake.sop_class_outcome(sop_class)
    if decided is not None:
        return Outcome(decided.status, decided.reason, **echo)
    outcome = intake.keep(spool, part.path, association, header)
    if outcome.reason:
        outcome = Outcome(outcome.status, f"part {part.number}: {outcome.reason}", **echo)
    return outcome


async def receive(request: Request, service, folder: Path, counts: StowCounts) -> bool:
    """Stream the body into ``folder`` part by part, each spooled as it ends (in a thread);
    whether the body ended with its closing boundary."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser

    config, spool = service.config, service.spool
    body = _Body(folder, config.max_instance_bytes)
    parser = MultipartParser(check_request(request, config, spool), body.callbacks())
    try:
        async for chunk in request.stream():
            counts.bytes += len(chunk)
            if counts.bytes > config.max_study_bytes:
                raise HTTPException(413, f"request body over the limit of {config.max_study_bytes} bytes "
                                         "(--max-study-bytes); the instances before it were kept")
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise HTTPException(400, f"the multipart body does not follow the boundary its Content-Type "
                                         f"announced ({exc.__class__.__name__}); the instances before it were kept")
            await _spool_ended(body, service, counts)
    finally:
        body.close()
    parser.finalize()
    await _spool_ended(body, service, counts)
    return body.finished


async def _spool_ended(body: _Body, service, counts: StowCounts) -> None:
    ended, body.ended = body.ended, []
    for part in ended:
        service.metrics.instances.inc()
        outcome = await asyncio.to_thread(_spool_part, service.spool, part, counts.key)
        counts.outcomes.append((part.number, outcome))
        if part.path.exists():  # not moved into the spool
            os.unlink(part.path)


def response(counts: StowCounts) -> Response:
    """The Store Instances Response (DICOM JSON) and its HTTP status."""
    from pydicom.dataset import Dataset

    document = Dataset()
    document.RetrieveURL = None  # type 2: this node does not serve WADO-RS
    kept, failed, warnings = [], [], []
    for number, outcome in counts.outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = outcome.sop_class, outcome.sop_uid
        if outcome.kept:
            item.RetrieveURL = None
            kept.append(item)
            continue
        item.FailureReason = outcome.status
        failed.append(item)
        warnings.append(_warning(outcome.reason or f"part {number}: refused"))
    if kept:
        document.ReferencedSOPSequence = kept
    if failed:
        document.FailedSOPSequence = failed
    status = 200 if not failed else 409 if not kept else 202
    headers = {"Warning": ", ".join(warnings[:MAX_WARNINGS])} if warnings else {}
    return Response(dumps(document.to_json_dict()), status_code=status, media_type=DICOM_JSON, headers=headers)


def _warning(reason: str) -> str:
    """An HTTP Warning value (RFC 7234: 299, the agent, the text quoted) saying why an instance failed."""
    text = printable(reason)[:200].replace("\\", "/").replace('"', "'")
    return f'299 ctedge "{text}"'


def log_request(counts: StowCounts, client: str, state: str) -> None:
    """One line per request, as for an association."""
    seconds = time.monotonic() - counts.started
    statuses = [outcome.status for _, outcome in counts.outcomes]
    stored = statuses.count(intake.SUCCESS)
    log.log(logging.INFO if state == "released" else logging.WARNING,
            "STOW-RS from %s %s after %.1f s: %d stored (%.1f MB/s), %d duplicate(s), %d not CT images "
            "(acknowledged, not kept), %d refused", client, state.upper() if state == "aborted" else state, seconds,
            stored, counts.bytes / 1e6 / max(seconds, 1e-6), statuses.count(intake.DUPLICATE),
            statuses.count(intake.OTHER), sum(s not in (intake.SUCCESS, intake.DUPLICATE, intake.OTHER)
                                               for s in statuses))
