"""The DICOM side: a Storage SCP (C-ECHO, C-STORE of CT Image Storage) on pynetdicom.

Every CT instance is written to the spool (fsync, rename) before its success status is
returned; other storage SOP classes (SRs, dose reports: a PACS sends whole studies) are
acknowledged and not kept; Enhanced CT is refused until it is supported. Transfer syntaxes:
every one the installed pydicom plugins decode (RLE always; JPEG family with
``ctedge[dicom-codecs]``). What a peer may make the node hold (who may associate, how
many at once and how long, PDU and instance sizes, UIDs) is ``guard``'s.
"""

from __future__ import annotations

import logging
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ctedge.core.errors import CtedgeError
from ctedge.edge.serve import intake
from ctedge.edge.serve.config import ServeConfig
from ctedge.edge.serve.guard import Gate, GuardedAE, Limits, checked_store
from ctedge.edge.serve.intake import CT_IMAGE_STORAGE, REFUSED_SOP_CLASSES
from ctedge.edge.serve.spool import Spool
from ctedge.edge.serve.transport import start_server

log = logging.getLogger(__name__)


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
    """The node's AE: its admission checks, timeouts and limits are guard.py's."""
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's per-PDU and per-message debug handlers: not bound
    limits = Limits(config.ae_title, config.max_associations, config.per_host_limit, config.associate_seconds,
                    config.idle_seconds, config.max_instance_bytes)
    return GuardedAE(limits, Gate(limits, config.admits, bool(config.allow)))


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
        syntaxes = decodable_syntaxes()
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context(CT_IMAGE_STORAGE, syntaxes)
        for uid in REFUSED_SOP_CLASSES:
            self.ae.add_supported_context(uid, syntaxes)
        for context in StoragePresentationContexts:  # a PACS sends whole studies, SRs included
            if context.abstract_syntax not in (CT_IMAGE_STORAGE, *REFUSED_SOP_CLASSES):
                self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.handlers = [(evt.EVT_C_STORE, checked_store(self._store, self._refused)),
                         (evt.EVT_C_ECHO, lambda event: 0x0000),
                         (evt.EVT_ESTABLISHED, self._opened), (evt.EVT_RELEASED, self._closed),
                         (evt.EVT_ABORTED, self._aborted)]
        self.server, self.bound_port = None, None
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
        host, port = self.config.host, self.config.dicom_port
        try:
            self.server = start_server(self.ae, (host, port), self.handlers, self.ssl_context())
        except OSError as exc:  # a busy port, an address this machine does not have
            raise CtedgeError(f"{port} on {host}: cannot listen ({exc.strerror or exc}); is another DICOM node "
                              "using it?", param="dicom_port") from None
        self.bound_port = self.server.server_address[1]
        log.info("DICOM node %s listening on %s:%d%s; %s", self.config.ae_title, self.config.host,
                 self.server.server_address[1], " (TLS)" if self.config.tls_cert else "",
                 "allowed: " + ", ".join(f"{p.ae_title}@{p.host or '*'}" for p in self.config.allow)
                 if self.config.allow else "only loopback peers allowed (--allow AET@HOST for others)")

    @property
    def port(self) -> int:
        return self.bound_port

    def stop(self) -> None:
        """Stop accepting; open associations get --drain-seconds to finish, then are aborted."""
        server, self.server = self.server, None
        if server:
            server.drain(self.config.drain_seconds)

    def _refused(self, event) -> None:
        """An instance over --max-instance-bytes: answered 0xA700, so its study may be incomplete."""
        c = self.counts.setdefault(id(event.assoc), AssociationCounts())
        c.refused += 1
        c.out_of_resources += 1

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
        self.on_received()
        outcome = intake.sop_class_outcome(str(event.request.AffectedSOPClassUID))
        if outcome is None:  # a CT image: parsed, checked, spooled
            data = event.encoded_dataset()
            outcome = intake.keep(self.spool, data, c.key)
            c.bytes += len(data) if outcome.status == intake.SUCCESS else 0
        c.stored += outcome.status == intake.SUCCESS
        c.duplicates += outcome.status == intake.DUPLICATE
        c.other += outcome.status == intake.OTHER
        c.refused += not outcome.kept
        c.out_of_resources += outcome.status == intake.OUT_OF_RESOURCES
        return intake.SUCCESS if outcome.kept else outcome.status
