"""What a peer can make the DICOM node hold: time, connections, PDU and instance sizes, UIDs.

pynetdicom 3.0.4 gives an ACSE timeout (the association thread stops waiting for an
A-ASSOCIATE-RQ, but its reader thread stays blocked in ``recv`` on a half-sent PDU, so the
connection keeps its slot), a network timeout (idle *established* associations are
aborted), ``maximum_associations`` (counting every connection's thread, half-open ones
included), ``maximum_pdu_size`` (announced to the peer, never enforced on receipt: the
reader reads whatever length a PDU header announces) and ``require_called_aet``. What this
module adds:

* a deadline to ask: a connection whose A-ASSOCIATE-RQ has not arrived whole
  ``associate_seconds`` after it was accepted (TLS: handshake and negotiation, the handshake
  done in its own thread, not the accept loop) is dropped; negotiating a request that did
  arrive is the node's own work and may take longer on a loaded machine;
* slots counted per host: at most ``max_associations`` negotiated associations, at most
  ``max_associations_per_host`` from one host (beyond: A-ASSOCIATE-RJ, transient, local
  limit exceeded); connections not yet negotiated are bounded apart (``CONNECTIONS_PER_SLOT``
  times as many; more are closed at once), so half-open sockets never take a sender's slot;
* every PDU's announced length checked before its body is read (the negotiated maximum
  once associated, ``ASSOCIATE_RQ_MAX`` before): longer is an A-ABORT, nothing allocated;
  one PDU must arrive within ``idle_seconds``;
* an instance over ``max_instance_bytes`` is not kept in memory past the limit and is
  answered 0xA700;
* UIDs checked against the UI value representation before anything is stored.
"""

from __future__ import annotations

import collections
import io
import logging
import threading
import time
from dataclasses import dataclass
from enum import Enum

from pydicom.uid import RE_VALID_UID
from pynetdicom import AE

log = logging.getLogger(__name__)

MAX_PDU = 1 << 20  # announced maximum PDU length: large enough for speed, small enough to hold 16 of
ASSOCIATE_RQ_MAX = 1 << 16  # an A-ASSOCIATE-RQ longer than 64 KiB is no sender's
CONNECTIONS_PER_SLOT = 4  # connections (negotiated or not) in all: 4x the associations; per host: half of that
OUT_OF_RESOURCES = 0xA700
LOG_EVERY_S = 60.0  # a repeated warning about one host: once a minute, with a count
KEYS_KEPT = 1000
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class Limits:
    """The node's bounds (from ``ServeConfig``)."""

    ae_title: str
    max_associations: int = 16
    max_per_host: int = 8
    associate_seconds: float = 5.0
    idle_seconds: float = 30.0
    max_instance_bytes: int = 256 << 20
    max_pdu: int = MAX_PDU


class Refusal(Enum):
    """Why an association request was rejected."""

    CALLING = "calling AE title or host not allowed"
    CALLED = "called AE title is not this node's"
    HOST_FULL = "local limit exceeded: that host holds its share of associations"
    FULL = "local limit exceeded: every association slot is taken"


class Throttled:
    """Warnings about one key (a host) at most once per ``every`` seconds, with how many were held back."""

    def __init__(self, every: float = LOG_EVERY_S):
        self.every, self.lock = every, threading.Lock()
        self.last: dict[str, tuple[float, int]] = {}

    def warn(self, key: str, message: str, *args) -> None:
        now = time.monotonic()
        with self.lock:
            if len(self.last) > KEYS_KEPT:  # many hosts: forget the quiet ones
                self.last = {k: v for k, v in self.last.items() if now - v[0] < self.every}
            last, held = self.last.get(key, (-self.every, 0))
            if now - last < self.every:
                self.last[key] = (last, held + 1)
                return
            self.last[key] = (now, 0)
        log.warning(message + (f" ({held} more like this in the last {self.every:.0f} s)" if held else ""), *args)


class Gate:
    """Connection and association slots, per host and in all."""

    def __init__(self, limits: Limits, admits, allow_given: bool):
        self.limits, self.admits, self.allow_given = limits, admits, allow_given  # admits(aet, address): --allow
        self.max_connections = CONNECTIONS_PER_SLOT * limits.max_associations
        self.max_host_connections = max(1, self.max_connections // 2)
        self.lock = threading.Condition()
        self.connections: collections.Counter[str] = collections.Counter()
        self.associations: collections.Counter[str] = collections.Counter()
        self.decisions: dict[object, Refusal | None] = {}
        self.throttle = Throttled()

    def connect(self, host: str) -> bool:
        """A new TCP connection from ``host``: whether it may wait for its negotiation."""
        with self.lock:
            total, from_host = sum(self.connections.values()), self.connections[host]
            refused = total >= self.max_connections or from_host >= self.max_host_connections
            if not refused:
                self.connections[host] += 1
        if refused:
            self.throttle.warn(f"connect {host}", "connection from %s closed at once: %d connection(s) open from it, "
                               "%d in all (at most %d from one host, %d in all)", host, from_host, total,
                               self.max_host_connections, self.max_connections)
        return not refused

    def disconnect(self, host: str, assoc=None) -> None:
        """A connection ended; its association's slot (if it had one) comes back."""
        with self.lock:
            self.connections[host] -= 1
            if self.connections[host] <= 0:
                del self.connections[host]
            if assoc is not None and assoc in self.decisions and self.decisions.pop(assoc) is None:
                self.associations[host] -= 1
                if self.associations[host] <= 0:
                    del self.associations[host]
            self.lock.notify_all()

    def admit(self, assoc) -> Refusal | None:
        """Whether ``assoc`` (negotiating) may associate: decided once, a slot taken when it may."""
        with self.lock:
            if assoc in self.decisions:
                return self.decisions[assoc]
            decision = self._decide(assoc)
            self.decisions[assoc] = decision
            if decision is None:
                self.associations[assoc.requestor.address] += 1
        if decision is not None:
            self._log_refusal(assoc, decision)
        return decision

    def _decide(self, assoc) -> Refusal | None:
        aet, host = assoc.requestor.ae_title.strip(), assoc.requestor.address
        if not self.admits(aet, host):
            return Refusal.CALLING
        if str(assoc.requestor.primitive.called_ae_title).strip() != self.limits.ae_title:
            return Refusal.CALLED
        if self.associations[host] >= self.limits.max_per_host:
            return Refusal.HOST_FULL
        if sum(self.associations.values()) >= self.limits.max_associations:
            return Refusal.FULL
        return None

    def _log_refusal(self, assoc, refusal: Refusal) -> None:
        from ctedge.core.files import printable

        aet, host = printable(assoc.requestor.ae_title.strip()), assoc.requestor.address
        if refusal is Refusal.CALLING:
            hint = "not in --allow; add it with --allow" if self.allow_given else \
                "only loopback peers are allowed; allow it with --allow"
            self.throttle.warn(f"refused {aet}@{host}", "association from %s@%s rejected: %s %s@%s", aet, host, hint,
                               aet, host)
        elif refusal is Refusal.CALLED:
            called = printable(str(assoc.requestor.primitive.called_ae_title).strip())
            self.throttle.warn(f"called {aet}@{host}", "association from %s@%s rejected: it called AE title %s, "
                               "this node is %s", aet, host, called, self.limits.ae_title)
        else:
            limit = (f"--max-associations-per-host {self.limits.max_per_host}" if refusal is Refusal.HOST_FULL
                     else f"--max-associations {self.limits.max_associations}")
            self.throttle.warn(f"full {host}", "association from %s@%s rejected (%s; %s)", aet, host, refusal.value,
                               limit)

    def open_associations(self) -> int:
        with self.lock:
            return sum(self.associations.values())

    def wait_closed(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for every connection to end; whether they all did."""
        deadline = time.monotonic() + seconds
        with self.lock:
            while self.connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.lock.wait(remaining)
        return True


def _current_association():
    """The association negotiating in this thread (pynetdicom asks the AE from it), else None."""
    thread = threading.current_thread()
    return thread if getattr(thread, "requestor", None) is not None and hasattr(thread, "acse") else None


class GuardedAE(AE):
    """An AE whose admission checks pynetdicom asks while negotiating, in the association's
    own thread, answer for that association: its calling AE and host (``--allow``), the
    called AE title, and the per-host and total association slots (``Gate.admit``)."""

    def __init__(self, limits: Limits, gate: Gate):
        self.limits, self.gate = limits, gate
        super().__init__(ae_title=limits.ae_title)
        self.acse_timeout = limits.associate_seconds
        self.network_timeout = limits.idle_seconds  # an established association idle this long is aborted
        self.maximum_pdu_size = limits.max_pdu

    def _decision(self) -> tuple[object, Refusal | None]:
        assoc = _current_association()
        return assoc, (self.gate.admit(assoc) if assoc is not None else None)

    @property
    def require_calling_aet(self) -> list[str]:
        assoc, decision = self._decision()
        if assoc is None:
            return []
        return ["\x00not-allowed"] if decision is Refusal.CALLING else [assoc.requestor.ae_title.strip()]

    @require_calling_aet.setter
    def require_calling_aet(self, value) -> None:  # AE.__init__ sets it
        pass

    @property
    def require_called_aet(self) -> bool:
        return self._decision()[1] is Refusal.CALLED  # pynetdicom then compares, and rejects

    @require_called_aet.setter
    def require_called_aet(self, value) -> None:
        pass

    @property
    def maximum_associations(self) -> int:
        assoc, decision = self._decision()
        if assoc is None:
            return self.limits.max_associations
        return 0 if decision in (Refusal.HOST_FULL, Refusal.FULL) else 1 << 30  # the Gate counted already

    @maximum_associations.setter
    def maximum_associations(self, value) -> None:
        pass


class CappedBuffer(io.BytesIO):
    """A received dataset that stops being kept once it passes ``limit`` bytes (it keeps counting)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.received = limit, 0

    @property
    def over(self) -> bool:
        return self.received > self.limit

    def write(self, data) -> int:
        self.received += len(data)
        if self.received > self.limit:
            if self.tell():
                self.seek(0)
                self.truncate()  # what was held goes now
            return len(data)
        return super().write(data)


def checked_store(handler, on_refused=lambda event: None):
    """``handler`` for EVT_C_STORE, with instances over the size limit answered 0xA700 first."""

    def store(event) -> int:
        dataset = event.request.DataSet
        if isinstance(dataset, CappedBuffer) and dataset.over:
            log.warning("C-STORE refused (out of resources): an instance of %d bytes, over --max-instance-bytes %d",
                        dataset.received, dataset.limit)
            on_refused(event)
            return OUT_OF_RESOURCES
        return handler(event)

    return store


def uid_problem(ds) -> str | None:
    """What is wrong with the dataset's UIDs (VR UI: 1-64 characters, digits in components
    separated by dots, no empty component, no leading zero), naming the attribute, never its value."""
    for keyword in UID_KEYWORDS:
        value = str(ds.get(keyword) or "")
        if not value:
            return f"{keyword} is missing or empty"
        if len(value) > 64:
            return f"{keyword} is {len(value)} characters long (at most 64)"
        if not RE_VALID_UID.match(value):
            return f"{keyword} is not a UID (digits and dots, no empty component, no leading zero)"
    return None
