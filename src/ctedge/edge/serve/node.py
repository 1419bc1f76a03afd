"""The DICOM side: a Storage SCP (C-ECHO, C-STORE of CT Image Storage) on pynetdicom.

Every CT instance is written to the spool (fsync, rename) before its success status is
returned; other storage SOP classes (SRs, dose reports: a PACS sends whole studies) are
acknowledged and not kept; Enhanced CT is refused until it is supported. Calling AE titles and hosts not allowed are rejected during association
negotiation, with the reason in the log. Transfer syntaxes: every one the installed
pydicom plugins decode (RLE always; JPEG family with ``ctedge[dicom-codecs]``).
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ctedge.edge.serve.config import ServeConfig
from ctedge.edge.serve.spool import Incoming, Spool, Stored, uid_hash

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
REFUSED_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage is not supported yet",
                       "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT is not supported yet"}
STATUS = {Stored.STORED: 0x0000, Stored.STUDY_FULL: 0xA700, Stored.DISK_LOW: 0xA700, Stored.PAUSED: 0xA700}
DUPLICATE = -1  # internal: acknowledged with 0x0000, counted as a duplicate
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
HEADER_TAGS = ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID", "SeriesInstanceUID",
               "ImagesInAcquisition"]


def decodable_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data an installed pydicom plugin decodes."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    syntaxes = []
    for uid in AllTransferSyntaxes:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            continue
        if decoder.is_available:
            syntaxes.append(str(uid))
    return syntaxes


def _make_ae(config: ServeConfig):
    from pynetdicom import AE

    class GuardedAE(AE):
        """An AE that admits only allowed (calling AE title, host) pairs. pynetdicom checks
        ``require_calling_aet`` while negotiating, in the association's own thread, so the
        answer can depend on that association's peer address."""

        @property
        def require_calling_aet(self) -> list[str]:
            assoc = threading.current_thread()
            requestor = getattr(assoc, "requestor", None)
            if requestor is None:
                return []
            aet, address = requestor.ae_title.strip(), requestor.address
            if config.admits(aet, address):
                return [aet]
            hint = ("only loopback peers are allowed; allow it with --allow"
                    if not config.allow else "not in --allow; add it with --allow")
            log.warning("association from %s@%s rejected: %s %s@%s", aet, address, hint, aet, address)
            return ["\x00not-allowed"]

        @require_calling_aet.setter
        def require_calling_aet(self, value) -> None:  # AE.__init__ sets it
            pass

    return GuardedAE(ae_title=config.ae_title)


def _expected(ds) -> int | None:
    """The instance's ImagesInAcquisition when it gives a usable one (a hint, never a refusal)."""
    try:
        value = int(ds.get("ImagesInAcquisition") or 0)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


@dataclass
class AssociationCounts:
    """What one association brought: its log line."""

    started: float = field(default_factory=time.monotonic)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # the journal's name for it
    stored: int = 0
    duplicates: int = 0
    other: int = 0  # not CT images: acknowledged, not kept
    refused: int = 0
    out_of_resources: int = 0  # of those refused: 0xA700 (the sender may send them again)
    bytes: int = 0


class Node:
    """The Storage SCP; ``on_received()`` is called for each C-STORE request."""

    def __init__(self, config: ServeConfig, spool: Spool, on_received: Callable = lambda: None):
        from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.config, self.spool, self.on_received = config, spool, on_received
        self.ae = _make_ae(config)
        self.ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
        syntaxes = decodable_syntaxes()
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context(CT_IMAGE_STORAGE, syntaxes)
        for uid in REFUSED_SOP_CLASSES:
            self.ae.add_supported_context(uid, syntaxes)
        for context in StoragePresentationContexts:  # a PACS sends whole studies, SRs included
            if context.abstract_syntax not in (CT_IMAGE_STORAGE, *REFUSED_SOP_CLASSES):
                self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, lambda event: 0x0000),
                         (evt.EVT_ESTABLISHED, self._opened), (evt.EVT_RELEASED, self._closed),
                         (evt.EVT_ABORTED, self._aborted)]
        self.server = None
        self.counts: dict[int, AssociationCounts] = {}

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.config.tls_cert), str(self.config.tls_key))
        if self.config.tls_ca:
            context.verify_mode = ssl.CERT_REQUIRED  # clients must show a certificate the CA signed
            context.load_verify_locations(str(self.config.tls_ca))
        return context

    def start(self) -> None:
        self.server = self.ae.start_server((self.config.host, self.config.dicom_port), block=False,
                                           evt_handlers=self.handlers, ssl_context=self.ssl_context())
        log.info("DICOM node %s listening on %s:%d%s; %s", self.config.ae_title, self.config.host,
                 self.server.server_address[1], " (TLS)" if self.config.tls_cert else "",
                 "allowed: " + ", ".join(f"{p.ae_title}@{p.host or '*'}" for p in self.config.allow)
                 if self.config.allow else "only loopback peers allowed (--allow AET@HOST for others)")

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()

    def _opened(self, event) -> None:
        self.counts[id(event.assoc)] = AssociationCounts()

    def _aborted(self, event) -> None:
        self._closed(event, aborted=True)

    def _closed(self, event, aborted: bool = False) -> None:
        c = self.counts.pop(id(event.assoc), AssociationCounts())
        if c.stored or c.duplicates:  # its studies: complete, or maybe not (aborted, instances refused)
            self.spool.association_closed(c.key, "aborted" if aborted else "refused" if c.out_of_resources
                                          else "released")
        requestor = event.assoc.requestor
        seconds = time.monotonic() - c.started
        log.log(logging.WARNING if aborted else logging.INFO,
                "association %s@%s %s after %.1f s: %d stored (%.1f MB/s), %d duplicate(s), %d not CT images "
                "(acknowledged, not kept), %d refused", requestor.ae_title, requestor.address,
                "ABORTED" if aborted else "released", seconds, c.stored, c.bytes / 1e6 / max(seconds, 1e-6),
                c.duplicates, c.other, c.refused)

    def _store(self, event) -> int:
        c = self.counts.setdefault(id(event.assoc), AssociationCounts())
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class in REFUSED_SOP_CLASSES:
            log.warning("C-STORE refused: %s", REFUSED_SOP_CLASSES[sop_class])
            c.refused += 1
            return SOP_CLASS_NOT_SUPPORTED
        if sop_class != CT_IMAGE_STORAGE:  # an SR, a dose report, a key image: nothing to classify
            c.other += 1
            return 0x0000
        data = event.encoded_dataset()
        status = self._keep(data, c.key)
        if status == 0x0000:
            c.stored += 1
            c.bytes += len(data)
        elif status == DUPLICATE:
            c.duplicates += 1
            status = 0x0000
        else:
            c.refused += 1
            c.out_of_resources += status == 0xA700
        return status

    def _keep(self, data: bytes, association: str) -> int:
        """Spool one CT instance; its DIMSE status (DUPLICATE: acknowledged, counted once)."""
        import io

        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=HEADER_TAGS)
            study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
            incoming = Incoming(study_uid, sop_uid, str(ds.get("SeriesInstanceUID", "")), _expected(ds), data)
        except Exception as exc:  # a dataset pydicom can't read, or without its UIDs
            log.warning("C-STORE refused: unreadable dataset or no StudyInstanceUID/SOPInstanceUID (%s)",
                        exc.__class__.__name__)
            return CANNOT_UNDERSTAND
        self.on_received()
        try:
            stored = self.spool.store(incoming, association)
        except (OSError, sqlite3.Error) as exc:  # a read-only spool, a broken journal: the sender keeps it
            log.error("C-STORE of study %s refused (out of resources): cannot write the spool (%s)",
                      uid_hash(study_uid), getattr(exc, "strerror", None) or exc)
            return STATUS[Stored.DISK_LOW]
        if stored in (Stored.STUDY_FULL, Stored.DISK_LOW, Stored.PAUSED):
            log.warning("C-STORE of study %s refused (out of resources): %s", uid_hash(study_uid), stored.value)
        return DUPLICATE if stored is Stored.DUPLICATE else STATUS[stored]
