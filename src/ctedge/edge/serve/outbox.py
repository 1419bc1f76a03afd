"""Results on their way to the PACS: the outbox loop sends the journal's due deliveries by
C-STORE (TLS with ``--destination-tls-ca``) or, to a ``dicomweb:`` destination, by STOW-RS
(checked to have arrived, see ``DicomWebSource.store``), each in its own try/except.

A delivery is ``pending`` for its first ``retries`` attempts (backoff ``retry_seconds``,
doubling, at most 5 minutes), then ``failed``: still tried every ``retry_failed_every``
seconds until it is sent, and counted, shown and logged as failed meanwhile. A result
goes out at least once: a crash between the PACS's acknowledgement and the journal's
record sends the same bytes (same SOPInstanceUID) again. Results of one study go to a
destination in version order; once a destination fails in a pass, its other results
that pass are recorded as failed attempts with the same error, not tried.
"""

from __future__ import annotations

import io
import logging
import ssl
import time

from ctedge.edge.serve.config import Destination, WebDestination
from ctedge.edge.serve.faults import Faults, is_disk_full
from ctedge.edge.serve.journal import Due, Journal
from ctedge.edge.serve.spool import uid_hash

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 300.0
IDLE_S = 1.0  # the longest the loop sleeps with nothing due


class Outbox:
    """The outbox loop's step."""

    def __init__(self, journal: Journal, destinations: list[Destination | WebDestination], ae_title: str,
                 retries: int, retry_seconds: float, retry_failed_every: float, pause, faults: Faults,
                 tls: ssl.SSLContext | None = None, timeout: float = 30.0, on_failed=None, web_auth: dict | None = None):
        self.journal, self.destinations = journal, {str(d): d for d in destinations}
        self.web_auth, self.web_clients = web_auth or {}, {}  # dicomweb: destination -> its DicomWebSource
        self.ae_title, self.retries, self.retry_seconds = ae_title, retries, retry_seconds
        self.retry_failed_every, self.pause, self.faults, self.tls, self.timeout = (
            retry_failed_every, pause, faults, tls, timeout)
        self.on_failed = on_failed or (lambda message: None)  # a delivery just became failed
        self.last_error: str | None = None

    def step(self) -> float:
        """Send what is due; the seconds until the next delivery is due (at most ``IDLE_S``)."""
        if self.pause.paused:
            return IDLE_S
        unreachable: dict[str, str] = {}  # destination -> its error in this pass
        for due in self.journal.due_deliveries(time.time()):
            try:
                self._attempt(due, unreachable)
            except Exception as exc:  # a journal error: that delivery is tried again later
                if is_disk_full(exc):
                    self.pause.set(f"cannot write the journal ({exc})")
                    break
                log.exception("result v%d of study %s", due.version, uid_hash(due.study_uid))
                self.last_error = f"{exc.__class__.__name__}: {exc}"
        following = self.journal.next_delivery()
        return IDLE_S if following is None else min(max(following - time.time(), 0.01), IDLE_S)

    def _attempt(self, due: Due, unreachable: dict[str, str]) -> None:
        name = f"{due.kind.upper()} v{due.version} of study {uid_hash(due.study_uid)}"
        error = unreachable.get(due.destination)
        if error is None:
            destination = self.destinations.get(due.destination)
            if destination is None:
                error = "destination no longer configured"
            else:
                self.faults.check()
                data = self.journal.delivery_data(due.id)
                error = self._store_web(data, destination, due.study_uid) if isinstance(destination, WebDestination) \
                    else send(data, destination, self.ae_title, self.tls, self.timeout)
        if error is None:
            self.faults.hit("delivery.sent")
            self.journal.delivery_sent(due.id)
            log.info("%s sent to %s%s", name, due.destination, " (after it had failed)" if due.status == "failed" else "")
            return
        unreachable[due.destination] = error
        attempts = due.attempts + 1
        self.last_error = f"{name} to {due.destination}: {error}"
        if due.status == "failed" or attempts >= self.retries:
            self.journal.delivery_failed(due.id, "failed", time.time() + self.retry_failed_every, error)
            message = (f"{name} not sent to {due.destination} after {attempts} attempt(s) ({error}); failed, "
                       f"tried again every {self.retry_failed_every:g} s")
            log.log(logging.ERROR if due.status != "failed" else logging.WARNING, "%s", message)
            if due.status != "failed":
                self.on_failed(message)
            return
        backoff = min(self.retry_seconds * 2 ** (attempts - 1), MAX_BACKOFF_S)
        self.journal.delivery_failed(due.id, "pending", time.time() + backoff, error)
        log.warning("%s to %s: %s; attempt %d of %d, next in %.1f s", name, due.destination, error, attempts,
                    self.retries, backoff)


    def _store_web(self, data: bytes, destination: WebDestination, study_uid: str) -> str | None:
        """STOW-RS one result; None when it arrived, else the reason."""
        from ctedge.edge.pacs import DicomWebSource, PullError, PullOptions

        name = str(destination)
        try:
            sop_uid = str(_header(data).SOPInstanceUID)
        except Exception as exc:  # damaged bytes: reported and retried like any failure
            return f"unreadable result ({exc.__class__.__name__})"
        try:
            if name not in self.web_clients:
                self.web_clients[name] = DicomWebSource(destination.url, options=PullOptions(timeout_s=self.timeout),
                                                        **self.web_auth)
            self.web_clients[name].store(data, study_uid, sop_uid)
        except PullError as exc:
            return str(exc).removeprefix(name.removeprefix("dicomweb:") + ": ")
        return None

    def close(self) -> None:
        for client in self.web_clients.values():
            client.close()


def _header(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])


def client_tls(ca, cert=None, key=None) -> ssl.SSLContext | None:
    """The TLS context for outgoing associations: the destinations' CA, and optionally the
    node's own certificate for destinations that ask for one; None: plain DICOM."""
    if ca is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def send(data: bytes, destination: Destination, ae_title: str, tls: ssl.SSLContext | None = None,
         timeout: float = 30.0) -> str | None:
    """C-STORE one DICOM file to a destination; None on success, else the reason."""
    import pydicom
    from pynetdicom import AE

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        sop_class, syntax = ds.SOPClassUID, ds.file_meta.TransferSyntaxUID
    except Exception as exc:  # damaged bytes: reported and retried like any failure
        return f"unreadable result ({exc.__class__.__name__})"
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(sop_class, syntax)
    tls_args = (tls, destination.host) if tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return "association rejected" if assoc.is_rejected else "association failed (no answer or no connection)"
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if not status or "Status" not in status:
        return "no C-STORE response"
    if status.Status not in (0x0000, 0xB000, 0xB006, 0xB007):
        return f"C-STORE status 0x{status.Status:04X}"
    return None
