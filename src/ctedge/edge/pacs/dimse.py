"""Pulling from a PACS over DIMSE (pynetdicom): C-FIND at study and series level, C-GET of
one series into a folder. C-GET brings the instances back on the same association, so the
PACS needs no route back to this machine (C-MOVE would need one), only this AE title in
its list of known modalities.
"""

from __future__ import annotations

import time
from pathlib import Path

from ctedge.edge.pacs.common import (
    SERIES_KEYS,
    STUDY_KEYS,
    InstanceSink,
    PullError,
    PullOptions,
    SeriesRef,
    StudyRef,
    check_ae_title,
    check_uid,
    count,
    decodable_syntaxes,
    parse_peer,
    text,
)

PENDING = (0xFF00, 0xFF01)
SUCCESS, WARNING = 0x0000, 0xB000
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STORE_REFUSED = 0xC000  # "cannot understand": an instance this pull refuses
DIMSE_OVERHEAD = 1 << 20  # command sets and PDU headers received beside the instances' bytes


class DimseSource:
    """A PACS reached as ``AET@HOST:PORT``, called from ``ae_title``."""

    def __init__(self, peer: str, ae_title: str = "CTEDGE", options: PullOptions | None = None):
        self.called, self.host, self.port = parse_peer(peer, "from_pacs")
        check_ae_title(ae_title, "ae_title")
        self.ae_title, self.options = ae_title, options or PullOptions()
        self.name = f"{self.called}@{self.host}:{self.port}"

    def describe(self, study: StudyRef) -> str:
        """How a pulled study is named in results."""
        return f"{self.name}/{study.study_uid}"

    def close(self) -> None:
        """Nothing held between calls: each query and retrieval has its own association."""

    def _associate(self, contexts: list[tuple[str, list[str] | None]], roles=(), handlers=()):
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        for attribute in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attribute, self.options.timeout_s)
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, *([syntaxes] if syntaxes else []))
        assoc = ae.associate(self.host, self.port, ae_title=self.called, ext_neg=list(roles),
                             evt_handlers=list(handlers))
        if not assoc.is_established:
            raise PullError(f"{self.name}: no association (unreachable, or the PACS does not know AE title "
                            f"{self.ae_title!r}: add it to its modalities)")
        _no_delay(assoc)
        return assoc

    def _find(self, level: str, keys: tuple[str, ...], query: dict[str, str], limit: int, what: str) -> list:
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for key in keys:
            setattr(identifier, key, "")
        for key, value in query.items():
            setattr(identifier, key, value)
        assoc = self._associate([(FIND, None)])
        answers = []
        try:
            for status, ds in assoc.send_c_find(identifier, FIND):
                code = getattr(status, "Status", None)
                if code in PENDING and ds is not None:
                    answers.append(ds)
                    if len(answers) > limit:
                        assoc.abort()
                        raise PullError(f"{self.name}: {what}")
                elif code != SUCCESS:
                    raise PullError(f"{self.name}: C-FIND failed (status {_hex(code)})")
        finally:
            if assoc.is_established:
                assoc.release()
        return answers

    def find_studies(self, query: dict[str, str]) -> list[StudyRef]:
        """Studies matching ``query`` (C-FIND, study level); PullError past ``max_studies``."""
        limit = self.options.max_studies
        answers = self._find("STUDY", STUDY_KEYS, query, limit,
                             f"matched more than {limit} studies; narrow --query (e.g. StudyDate=YYYYMMDD, "
                             "AccessionNumber=...) or raise --max-studies")
        studies: dict[str, StudyRef] = {}
        for ds in answers:
            uid = check_uid(_raw(ds, "StudyInstanceUID"), "StudyInstanceUID", self.name)
            modalities = ds.get("ModalitiesInStudy", "") or ""
            studies.setdefault(uid, StudyRef(
                study_uid=uid, patient_id=text(ds.get("PatientID")), accession_number=text(ds.get("AccessionNumber")),
                study_date=text(ds.get("StudyDate")), study_time=text(ds.get("StudyTime")),
                modalities=tuple(text(m) for m in ([modalities] if isinstance(modalities, str) else modalities) if m),
                description=text(ds.get("StudyDescription")),
                instances=count(ds.get("NumberOfStudyRelatedInstances"))))
        return list(studies.values())

    def find_series(self, study: StudyRef) -> list[SeriesRef]:
        """The series of one study (C-FIND, series level)."""
        answers = self._find("SERIES", SERIES_KEYS, {"StudyInstanceUID": study.study_uid}, self.options.max_series,
                             f"answered more than {self.options.max_series} series for study {study.study_uid}")
        series = {}
        for ds in answers:
            if (_raw(ds, "StudyInstanceUID") or study.study_uid) != study.study_uid:
                raise PullError(f"{self.name}: answered a series of another study when study {study.study_uid} "
                                "was asked for; refused (the UIDs must match what was asked)")
            uid = check_uid(_raw(ds, "SeriesInstanceUID"), "SeriesInstanceUID", self.name)
            series[uid] = SeriesRef(uid, modality=_given(ds, "Modality"), description=_given(ds, "SeriesDescription"),
                                    body_part=_given(ds, "BodyPartExamined"),
                                    instances=count(ds.get("NumberOfSeriesRelatedInstances")))
        return list(series.values())

    def fetch_series(self, study: StudyRef, series_uid: str, folder: Path) -> int:
        """Retrieve one series into ``folder`` (C-GET); the number of instances kept. PullError
        when the PACS fails, sends what was not asked for, or exceeds a bound."""
        from pydicom.dataset import Dataset
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        sink = InstanceSink(folder, study, series_uid, self.options, self.name)
        received = [0]

        def data(event) -> None:
            """Every PDU as it arrives: past the budget the connection is closed, so one huge
            instance is not held in memory whole before it could be refused."""
            received[0] += len(event.data)
            if received[0] > self.options.max_bytes + DIMSE_OVERHEAD and not sink.problem:
                sink.problem = PullError(f"{self.name}: sent more than {self.options.max_bytes:,} bytes for series "
                                         f"{series_uid} (raise it with ctedge --max-bytes N); cut off")
                _close(event.assoc)

        def store(event) -> int:
            if sink.problem:
                return STORE_REFUSED
            try:
                sink.add(event.encoded_dataset())
            except PullError:
                return STORE_REFUSED
            return SUCCESS

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID, identifier.SeriesInstanceUID = study.study_uid, series_uid
        assoc = self._associate([(GET, None), (CT_IMAGE_STORAGE, decodable_syntaxes())],
                                roles=[build_role(CT_IMAGE_STORAGE, scp_role=True)],
                                handlers=[(evt.EVT_C_STORE, store), (evt.EVT_DATA_RECV, data)])
        deadline = time.monotonic() + self.options.deadline_s
        final, failed = None, 0
        try:
            for status, _ in assoc.send_c_get(identifier, GET):
                final = getattr(status, "Status", None)
                failed = count(getattr(status, "NumberOfFailedSubOperations", 0)) or 0
                if sink.problem or time.monotonic() > deadline:
                    assoc.abort()
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        if sink.problem:
            raise sink.problem
        if time.monotonic() > deadline:
            raise PullError(f"{self.name}: series {series_uid} not retrieved within {self.options.deadline_s:g} s")
        if final not in (SUCCESS, WARNING) or failed or not sink.count:
            raise PullError(f"{self.name}: C-GET of series {series_uid} failed (status {_hex(final)}, "
                            f"{sink.count} instance(s) received, {failed} failed)")
        return sink.count


def _no_delay(assoc) -> None:
    """Small DIMSE messages go out at once: with Nagle's algorithm on (pynetdicom's default), a
    series-level C-FIND against Orthanc took 0.11 s instead of 0.06 s."""
    import socket

    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close(assoc) -> None:
    """Close the association's connection from its own reader thread (an abort would join it)."""
    sock = getattr(assoc.dul, "socket", None)
    if sock is not None:
        sock.close()


def _raw(ds, keyword: str) -> str:
    """A UID as the PACS sent it, read without pydicom's conversion (which warns about what
    ``check_uid`` refuses with a message of its own)."""
    element = ds.get_item(keyword)
    value = getattr(element, "value", None)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value or "").strip(" \0")


def _given(ds, keyword: str) -> str | None:
    """A series-level value, None when the PACS did not return it."""
    value = ds.get(keyword, None)
    return None if value is None or value == "" else text(value)


def _hex(code) -> str:
    return "none" if code is None else f"0x{int(code):04X}"
