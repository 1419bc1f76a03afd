"""Pulling from a PACS over DICOMweb: QIDO-RS for studies and their series, WADO-RS for the
instances of one chosen series, streamed into a folder; and STOW-RS of one file (the node's
results), checked to have arrived.

A small client on httpx rather than dicomweb-client: dicomweb-client reads a multipart
body into memory until it finds the next boundary (the whole body when the boundary
lies, and forever when the body never ends) and has no overall deadline, while every
byte here is counted against ``PullOptions.max_bytes`` as it arrives, a response that
stalls or trickles is cut off, and the multipart body is parsed as a stream by
python-multipart (headers bounded, a boundary that does not match refused).
"""

from __future__ import annotations

import email.message
import json
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

from ctedge.core.errors import CtedgeError
from ctedge.edge.pacs.common import (
    InstanceSink,
    PullError,
    PullOptions,
    SeriesRef,
    StudyRef,
    check_uid,
    count,
    text,
    thickness,
)

DICOM_JSON = "application/dicom+json"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# QIDO-RS attribute tags (keyword -> tag) read from answers
TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "PatientID": "00100020",
        "AccessionNumber": "00080050", "StudyDate": "00080020", "StudyTime": "00080030",
        "ModalitiesInStudy": "00080061", "StudyDescription": "00081030", "Modality": "00080060",
        "SeriesDescription": "0008103E", "BodyPartExamined": "00180015", "ImageType": "00080008",
        "SliceThickness": "00180050", "NumberOfSeriesRelatedInstances": "00201209",
        "NumberOfStudyRelatedInstances": "00201208", "SOPInstanceUID": "00080018",
        "ReferencedSOPSequence": "00081199", "FailedSOPSequence": "00081198", "ReferencedSOPInstanceUID": "00081155",
        "FailureReason": "00081197"}
STUDY_FIELDS = ("PatientID", "AccessionNumber", "StudyDate", "StudyTime", "ModalitiesInStudy", "StudyDescription",
                "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("Modality", "SeriesDescription", "BodyPartExamined", "ImageType", "SliceThickness",
                 "NumberOfSeriesRelatedInstances")


class DicomWebSource:
    """A DICOMweb service at ``url`` (its base, e.g. ``http://pacs:8042/dicom-web``), with a
    bearer ``token`` or basic auth (``user``, ``password``)."""

    def __init__(self, url: str, *, token: str | None = None, user: str | None = None, password: str | None = None,
                 options: PullOptions | None = None):
        import httpx

        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise CtedgeError(f"must be an http(s) URL without query, e.g. http://pacs:8042/dicom-web, not {url!r}",
                              param="from_dicomweb")
        if token and (user or parts.username):
            raise CtedgeError("and basic auth (a user): give one", param="dicomweb_token")
        user, password = user or parts.username, password if password is not None else parts.password
        self.base = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
        self.name = self.base  # never with credentials
        self.options = options or PullOptions()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        auth = httpx.BasicAuth(user, password or "") if user else None
        self.client = httpx.Client(headers=headers, auth=auth, follow_redirects=False,
                                   timeout=httpx.Timeout(self.options.timeout_s))

    def close(self) -> None:
        self.client.close()

    def describe(self, study: StudyRef) -> str:
        """How a pulled study is named in results: its DICOMweb resource."""
        return f"{self.base}/studies/{study.study_uid}"

    # --- QIDO-RS ---------------------------------------------------------------------

    def _json(self, path: str, params: list[tuple[str, str]]) -> list[dict]:
        """A QIDO-RS answer: a JSON array of objects, at most ``max_answer_bytes``."""
        limit = self.options.max_answer_bytes
        body = bytearray()
        with self._stream(path, {"Accept": DICOM_JSON}, params) as response:
            if response.status_code == 204:
                return []
            for chunk in self._chunks(response, time.monotonic() + self.options.deadline_s):
                body += chunk
                if len(body) > limit:
                    raise PullError(f"{self.name}: QIDO-RS answer to {path} is larger than {limit:,} bytes; refused "
                                    "(narrow --query)")
        try:
            answer = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise PullError(f"{self.name}: QIDO-RS answer to {path} is not JSON ({exc})") from None
        if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
            raise PullError(f"{self.name}: QIDO-RS answer to {path} is not a JSON array of objects")
        return answer

    def find_studies(self, query: dict[str, str]) -> list[StudyRef]:
        """Studies matching ``query``; PullError past ``max_studies`` (asked with ``limit``, checked)."""
        limit = self.options.max_studies
        params = [*query.items(), *(("includefield", TAGS[k]) for k in STUDY_FIELDS), ("limit", str(limit + 1))]
        answer = self._json("/studies", params)
        if len(answer) > limit:
            raise PullError(f"{self.name}: matched {len(answer):,} studies, more than --max-studies {limit}; "
                            "narrow --query (e.g. StudyDate=YYYYMMDD, AccessionNumber=...) or raise --max-studies")
        studies: dict[str, StudyRef] = {}
        for item in answer:
            uid = check_uid(_value(item, "StudyInstanceUID"), "StudyInstanceUID", self.name)
            studies.setdefault(uid, StudyRef(
                study_uid=uid, patient_id=text(_value(item, "PatientID")),
                accession_number=text(_value(item, "AccessionNumber")), study_date=text(_value(item, "StudyDate")),
                study_time=text(_value(item, "StudyTime")),
                modalities=tuple(text(m) for m in _values(item, "ModalitiesInStudy")),
                description=text(_value(item, "StudyDescription")),
                instances=count(_value(item, "NumberOfStudyRelatedInstances"))))
        return list(studies.values())

    def find_series(self, study: StudyRef) -> list[SeriesRef]:
        """The series of one study, with what the rules can judge before retrieving."""
        params = [("includefield", TAGS[k]) for k in SERIES_FIELDS]
        answer = self._json(f"/studies/{study.study_uid}/series", params)
        if len(answer) > self.options.max_series:
            raise PullError(f"{self.name}: answered {len(answer)} series for study {study.study_uid}, more than "
                            f"{self.options.max_series}; refused")
        series = {}
        for item in answer:
            if _value(item, "StudyInstanceUID") not in (None, study.study_uid):
                raise PullError(f"{self.name}: answered a series of another study when study {study.study_uid} was "
                                "asked for; refused (the UIDs must match what was asked)")
            uid = check_uid(_value(item, "SeriesInstanceUID"), "SeriesInstanceUID", self.name)
            image_type = tuple(text(v).upper() for v in _values(item, "ImageType")) or None
            series[uid] = SeriesRef(uid, modality=_optional(item, "Modality"),
                                    description=_optional(item, "SeriesDescription"),
                                    body_part=_optional(item, "BodyPartExamined"), image_type=image_type,
                                    thickness_mm=thickness(_value(item, "SliceThickness")),
                                    instances=count(_value(item, "NumberOfSeriesRelatedInstances")))
        return list(series.values())

    # --- WADO-RS ---------------------------------------------------------------------

    def fetch_series(self, study: StudyRef, series_uid: str, folder: Path) -> int:
        """Retrieve the instances of one series into ``folder``; how many were kept. PullError
        when the service fails, sends what was not asked for, or exceeds a bound."""
        sink = InstanceSink(folder, study, series_uid, self.options, self.name)
        path = f"/studies/{study.study_uid}/series/{series_uid}"
        deadline = time.monotonic() + self.options.deadline_s
        with self._stream(path, {"Accept": WADO_ACCEPT}, []) as response:
            declared = count(response.headers.get("content-length"))
            if declared is not None and declared > self.options.max_bytes:
                raise PullError(f"{self.name}: WADO-RS response for series {series_uid} declares {declared:,} "
                                f"bytes, more than {self.options.max_bytes:,} (ctedge --max-bytes); refused")
            parts = _Parts(sink, _boundary(response.headers.get("content-type", ""), self.name))
            for chunk in self._chunks(response, deadline):
                parts.write(chunk)
            parts.finish()
        if not sink.count:
            raise PullError(f"{self.name}: WADO-RS returned no instance for series {series_uid}")
        return sink.count

    # --- STOW-RS ---------------------------------------------------------------------

    def store(self, data: bytes, study_uid: str, sop_uid: str) -> None:
        """Store one DICOM file (STOW-RS), sent with a Content-Length (Orthanc may answer a chunked
        body 200 and store nothing); PullError unless the answer's ReferencedSOPSequence, or a
        QIDO-RS after it, shows the instance stored."""
        import httpx

        boundary = uuid.uuid4().hex
        body = b"".join((f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data,
                         f"\r\n--{boundary}--\r\n".encode()))
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": DICOM_JSON}
        content, limit = bytearray(), self.options.max_answer_bytes
        try:
            with self.client.stream("POST", self.base + "/studies", content=body, headers=headers) as response:
                for chunk in self._chunks(response, time.monotonic() + self.options.deadline_s):
                    content += chunk
                    if len(content) > limit:
                        raise PullError(f"{self.name}: STOW-RS answer larger than {limit:,} bytes; cut off")
        except httpx.TimeoutException:
            raise PullError(f"{self.name}: no answer to STOW-RS within {self.options.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise PullError(f"{self.name}: STOW-RS: {exc.__class__.__name__}: {exc}") from None
        stored, failed = _stow_answer(bytes(content))
        if sop_uid in failed:
            raise PullError(f"{self.name}: STOW-RS refused the instance (HTTP {response.status_code}, FailureReason "
                            f"0x{failed[sop_uid]:04X})")
        if response.status_code not in (200, 202):
            _check_status(response, self.name, "/studies")
            raise PullError(f"{self.name}: STOW-RS answered HTTP {response.status_code}")
        if sop_uid not in stored and not self.holds(study_uid, sop_uid):
            raise PullError(f"{self.name}: STOW-RS answered HTTP {response.status_code} but the instance is not "
                            "there (not in the answer's ReferencedSOPSequence, nor found by QIDO-RS)")

    def holds(self, study_uid: str, sop_uid: str) -> bool:
        """Whether QIDO-RS finds the instance in the study."""
        answer = self._json(f"/studies/{study_uid}/instances", [("SOPInstanceUID", sop_uid)])
        return any(_value(item, "SOPInstanceUID") == sop_uid for item in answer)

    # --- HTTP ------------------------------------------------------------------------

    def _stream(self, path: str, headers: dict, params: list[tuple[str, str]]):
        """A streamed GET whose status is checked; the caller reads the body."""
        import contextlib

        import httpx

        @contextlib.contextmanager
        def opened():
            try:
                with self.client.stream("GET", self.base + path + _query(params), headers=headers) as response:
                    _check_status(response, self.name, path)
                    yield response
            except httpx.TimeoutException:
                raise PullError(f"{self.name}: no answer to {path} within {self.options.timeout_s:g} s") from None
            except httpx.HTTPError as exc:
                raise PullError(f"{self.name}: {path}: {exc.__class__.__name__}: {exc}") from None

        return opened()

    def _chunks(self, response, deadline: float):
        """The body as it arrives; PullError once ``deadline`` has passed."""
        for chunk in response.iter_bytes():  # as it arrives (a chunk size would wait for that many bytes)
            if time.monotonic() > deadline:
                raise PullError(f"{self.name}: {response.url.path} still sending after {self.options.deadline_s:g} s; "
                                "cut off")
            yield chunk


def _query(params: list[tuple[str, str]]) -> str:
    """The query string, with QIDO-RS's wildcards (``*``, ``?``) and DICOM's range and
    multi-value marks as they are: some servers (Orthanc 1.10) match ``%2A`` literally."""
    return "?" + urlencode(params, safe="*?,-^") if params else ""


def _check_status(response, name: str, path: str) -> None:
    code = response.status_code
    if code in (200, 204):
        return
    if code in (401, 403):
        raise PullError(f"{name}: {path}: HTTP {code}, access refused (check --dicomweb-token or "
                        "--dicomweb-user and CTEDGE_DICOMWEB_PASSWORD)")
    if 300 <= code < 400:
        raise PullError(f"{name}: {path}: HTTP {code}, a redirect (to {response.headers.get('location', '?')[:200]!r}) "
                        "is not followed: give the service's own URL")
    raise PullError(f"{name}: {path}: HTTP {code}")


def _boundary(content_type: str, name: str) -> bytes:
    message = email.message.Message()
    message["content-type"] = content_type
    boundary = message.get_param("boundary")
    if message.get_content_type() != "multipart/related" or not isinstance(boundary, str) or \
            not 0 < len(boundary) <= 70:
        raise PullError(f"{name}: WADO-RS answered {content_type[:120]!r}, not multipart/related with a boundary")
    return boundary.encode("latin-1", "replace")


class _Parts:
    """A multipart/related body parsed as it streams (python-multipart), each part written to
    the sink's next file and checked when it ends."""

    def __init__(self, sink: InstanceSink, boundary: bytes):
        from python_multipart.multipart import MultipartParser

        self.sink, self.file, self.path, self.ended = sink, None, None, False
        self.parser = MultipartParser(boundary, {"on_part_begin": self._begin, "on_part_data": self._data,
                                                 "on_part_end": self._end, "on_end": self._done})

    def write(self, chunk: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            self._close()
            raise PullError(f"{self.sink.source}: WADO-RS multipart body does not follow the boundary its "
                            f"Content-Type announced ({exc}); refused") from None
        except PullError:
            self._close()
            raise

    def finish(self) -> None:
        self.parser.finalize()
        if not self.ended:
            self._close()
            raise PullError(f"{self.sink.source}: WADO-RS multipart body ended before its closing boundary "
                            "(truncated, or a boundary that does not match); refused")

    def _begin(self) -> None:
        self.path = self.sink.next_path()
        self.file = open(self.path, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.sink.reserve(end - start)
        self.file.write(data[start:end])

    def _end(self) -> None:
        self.file.close()
        self.file = None
        with open(self.path, "rb") as fp:
            self.sink.check(fp, self.path.name)

    def _done(self) -> None:
        self.ended = True

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _stow_answer(content: bytes) -> tuple[set[str], dict[str, int]]:
    """The SOP Instance UIDs a Store Instances Response lists as stored, and those it lists as
    failed with their FailureReason; empty when the answer is not DICOM JSON."""
    try:
        answer = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return set(), {}
    if isinstance(answer, list) and answer:  # some servers wrap the dataset in an array
        answer = answer[0]
    if not isinstance(answer, dict):
        return set(), {}

    def items(tag: str) -> list[dict]:
        entry = answer.get(tag)
        values = entry.get("Value") if isinstance(entry, dict) else None
        return [item for item in values if isinstance(item, dict)] if isinstance(values, list) else []

    stored = {str(_value(item, "ReferencedSOPInstanceUID")) for item in items(TAGS["ReferencedSOPSequence"])}
    failed = {str(_value(item, "ReferencedSOPInstanceUID")): count(_value(item, "FailureReason")) or 0
              for item in items(TAGS["FailedSOPSequence"])}
    return stored, failed


def _values(item: dict, keyword: str) -> list:
    entry = item.get(TAGS[keyword])
    values = entry.get("Value") if isinstance(entry, dict) else None
    return values if isinstance(values, list) else []


def _value(item: dict, keyword: str):
    values = _values(item, keyword)
    return values[0] if values else None


def _optional(item: dict, keyword: str) -> str | None:
    value = text(_value(item, keyword))
    return value or None
