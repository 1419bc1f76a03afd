"""How the node reads its connections: the mechanics behind ``guard``'s limits.

pynetdicom's server, request handler, socket and DIMSE provider, each with one change:
the server checks the Gate at accept and moves the TLS handshake into the connection's
thread; the handler waits for a whole A-ASSOCIATE-RQ (at most ``ASSOCIATE_RQ_MAX``) before
any pynetdicom thread exists, then watches the negotiation deadline; the socket reads a PDU
body only when its announced length is within the negotiated maximum; the DIMSE provider
keeps each incoming dataset in a ``CappedBuffer``.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ctedge.edge.serve.guard import ASSOCIATE_RQ_MAX, CappedBuffer, Gate, GuardedAE, Limits

log = logging.getLogger(__name__)
ACCEPT_POLL_S = 0.2  # how soon the accept loop notices it should stop
# A plain connection's A-ASSOCIATE-RQ has arrived whole before negotiation starts: what is left
# is the node's own work, given this long beyond the peer's deadline (a loaded machine is slow)
NEGOTIATION_GRACE_S = 10.0


class PduLimitedSocket(AssociationSocket):
    """pynetdicom's socket, reading each PDU body only when its announced length is within the
    limit (the reader asks ``recv(6)`` for a header, then ``recv(length)``), within a deadline,
    in large reads."""

    def recv(self, nr_bytes: int) -> bytearray:
        assoc = self.assoc
        limits: Limits = assoc.ae.limits
        established = assoc.is_established
        limit = assoc.acceptor.maximum_length if established else ASSOCIATE_RQ_MAX
        if nr_bytes > limit:
            self._abort(nr_bytes, limit, established)
        seconds = limits.idle_seconds if established else limits.associate_seconds
        if established and not getattr(self, "_idle_timeout", False):
            self.socket.settimeout(limits.idle_seconds)
            self._idle_timeout = True
        deadline, buffer, got = time.monotonic() + seconds, bytearray(nr_bytes), 0
        view = memoryview(buffer)
        try:
            while got < nr_bytes:
                count = self.socket.recv_into(view[got:])  # a timeout: silent for `seconds`
                if not count:
                    break
                got += count
                if got < nr_bytes and time.monotonic() > deadline:
                    raise TimeoutError("slow")
        except TimeoutError:
            log.warning("association from %s aborted: a PDU of %d bytes did not arrive within %g s", self._who(),
                        nr_bytes, seconds)
            raise
        finally:
            view.release()
        if got < nr_bytes:
            del buffer[got:]
        return buffer

    def _who(self) -> str:
        requestor = self.assoc.requestor
        if self.assoc.is_established:
            return f"{requestor.ae_title.strip()}@{requestor.address}"
        return requestor.address

    def _abort(self, length: int, limit: int, established: bool) -> None:
        """A-ABORT (service provider, invalid PDU parameter value) instead of reading the body."""
        _send_abort(self.socket)
        self.refused = True
        log.warning("association from %s aborted: a PDU of %d bytes announced, over %s of %d", self._who(), length,
                    "the negotiated maximum" if established else "the limit for an association request", limit)
        raise ConnectionAbortedError(f"PDU of {length} bytes over the limit of {limit}")


class CappedDimse(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with each incoming dataset in a ``CappedBuffer``."""

    def receive_primitive(self, primitive) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = CappedBuffer(self.assoc.ae.limits.max_instance_bytes)
        super().receive_primitive(primitive)


class GuardedHandler(RequestHandler):
    """One connection, from accept to close: TLS handshake and negotiation within the deadline
    (else the socket is shut, which ends any read blocked on it), then the association's
    lifetime; the Gate's slots are given back when its thread ends."""

    def handle(self) -> None:
        server, host = self.server, self.client_address[0]
        limits: Limits = server.ae.limits
        deadline, assoc = time.monotonic() + limits.associate_seconds, None
        try:
            if not self._handshake(server.gate) or not self._request_arrived(deadline):
                return
            assoc = self._create_association()
            assoc.dul.socket.__class__ = PduLimitedSocket  # pynetdicom makes both inside; ours add the bounds
            assoc.dimse.__class__ = CappedDimse
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            tls = isinstance(self.request, ssl.SSLSocket)  # only the request's first bytes are known to be here
            assoc.join(max(0.0, deadline - time.monotonic()) + (0.0 if tls else NEGOTIATION_GRACE_S))
            if assoc.is_alive() and not (assoc.is_established or assoc.is_rejected or assoc.is_aborted
                                         or assoc.is_released or getattr(assoc.dul.socket, "refused", False)):
                self._dropped(limits)
                _shut(self.request)
            assoc.join()
        finally:
            server.gate.disconnect(host, assoc)

    def _request_arrived(self, deadline: float) -> bool:
        """Whether the A-ASSOCIATE-RQ arrived whole before the deadline (TLS: its first bytes),
        and within ``ASSOCIATE_RQ_MAX``. Until then no pynetdicom thread exists for the connection
        (theirs poll every millisecond): a silent or half-open one costs one mostly sleeping thread."""
        sock, wanted, pause = self.request, 6, 0.005
        tls = isinstance(sock, ssl.SSLSocket)
        while (tls and sock.pending()) or select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if tls:
                return True
            head = sock.recv(wanted, socket.MSG_PEEK)
            if not head:  # closed before a word: nothing to negotiate
                self.server.shutdown_request(sock)
                return False
            if head[0] != 0x01:  # a port scanner, an HTTP client: not an A-ASSOCIATE-RQ
                self.server.gate.throttle.warn(f"garbage {self.client_address[0]}", "connection from %s closed: "
                                               "not a DICOM association request", self.client_address[0])
                self.server.shutdown_request(sock)
                return False
            if len(head) >= 6 and wanted == 6:
                length = struct.unpack(">L", head[2:6])[0]
                if length > ASSOCIATE_RQ_MAX:
                    _send_abort(sock)
                    log.warning("connection from %s aborted: it announced a PDU of %d bytes before associating "
                                "(at most %d)", self.client_address[0], length, ASSOCIATE_RQ_MAX)
                    self.server.shutdown_request(sock)
                    return False
                wanted = 6 + length
            if len(head) >= wanted:  # the whole request: pynetdicom reads it at once
                return True
            if time.monotonic() + pause > deadline:
                break
            time.sleep(pause)  # part of it: select would answer at once, so give the rest a moment
            pause = min(2 * pause, 0.05)
        self._dropped(self.server.ae.limits)
        self.server.shutdown_request(sock)
        return False

    def _dropped(self, limits: Limits) -> None:
        host = self.client_address[0]
        self.server.gate.throttle.warn(f"slow {host}", "connection from %s dropped: no association within %g s of "
                                       "connecting", host, limits.associate_seconds)

    def _handshake(self, gate: Gate) -> bool:
        """TLS: the handshake, here rather than in the accept loop (where one silent peer blocks all)."""
        if not isinstance(self.request, ssl.SSLSocket):
            return True
        try:
            self.request.do_handshake()
            return True
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            gate.throttle.warn(f"tls {self.client_address[0]}", "connection from %s closed: TLS handshake failed (%s)",
                               self.client_address[0], getattr(exc, "reason", None) or exc.__class__.__name__)
            self.server.shutdown_request(self.request)
            return False


def _send_abort(sock) -> None:
    """A-ABORT (service provider, invalid PDU parameter value), then the socket shut: whatever
    else the peer sends is refused by the kernel, never buffered."""
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = 0x02, 0x06
    try:
        sock.sendall(abort.encode())
    except OSError:
        pass
    _shut(sock)


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the Gate at accept, the handshake moved to the
    connection's thread, and a drain on the way out."""

    daemon_threads, block_on_close = True, False  # the Gate waits for connections, bounded (drain)
    request_queue_size = 128  # the listen backlog (socketserver's 5 makes a burst of connects wait seconds)

    def __init__(self, *args, gate: Gate, **kwargs):
        self.gate = gate
        super().__init__(*args, request_handler=GuardedHandler, **kwargs)

    def get_request(self):
        client, address = self.socket.accept()
        client.settimeout(self.gate.limits.associate_seconds)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request, client_address) -> bool:
        return self.gate.connect(client_address[0])

    def process_request(self, request, client_address) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it: its slot comes back here
            self.gate.disconnect(client_address[0])
            raise

    def handle_error(self, request, client_address) -> None:
        log.error("connection from %s: internal error", client_address[0], exc_info=True)

    def drain(self, seconds: float) -> None:
        """Stop accepting; give open associations ``seconds`` to finish, then abort them."""
        self.shutdown()
        if not self.gate.wait_closed(seconds):
            open_now = [assoc for assoc in self.active_associations if assoc.is_alive()]
            log.warning("stopping: %d association(s) still open after %g s, aborted", len(open_now), seconds)
            for assoc in open_now:
                assoc.abort()
            self.gate.wait_closed(2.0)


def start_server(ae: GuardedAE, address: tuple[str, int], handlers: list, ssl_context) -> GuardedServer:
    """The node's server, listening, served from a daemon thread (as ``AE.start_server`` does)."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=handlers, server_class=GuardedServer,
                            gate=ae.gate)
    ae._servers.append(server)  # pynetdicom's own list: AE.shutdown and server.shutdown use it
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": ACCEPT_POLL_S}, name="ctedge-dicom-accept",
                     daemon=True).start()
    return server
