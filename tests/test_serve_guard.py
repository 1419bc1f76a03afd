"""`ctedge serve`'s DICOM node against peers that do not play by the rules, with real sockets
on loopback: half-open and bare connections, per-host and total caps, oversized PDUs and
instances. Every loop here is bounded and the deadlines are options set short."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ctedge.core.phantom_studies import write_study
from ctedge.edge.serve.config import Peer
from ctedge.edge.serve.guard import CappedBuffer
from serve_fixtures import LOOPBACK, running_service, send_files, serve_model, study_files, wait_for

__all__ = ["serve_model"]
ABORT_INVALID_PDU = bytes.fromhex("07000000000400000206")  # A-ABORT, service provider, invalid PDU parameter


def _half_open(port: int, length: int = 200) -> socket.socket:
    """A connection that sent an A-ASSOCIATE-RQ header announcing ``length`` bytes, then nothing."""
    sock = socket.create_connection((LOOPBACK, port), timeout=5)
    sock.sendall(b"\x01\x00" + struct.pack(">L", length))
    return sock


def _closed_by_node(sock: socket.socket, within: float) -> bool:
    """Whether the node closed ``sock`` within ``within`` seconds (what it sent before is skipped)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _associate(port: int, source: str = LOOPBACK, ae_title: str = "SCANNER"):
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    return ae.associate(LOOPBACK, port, ae_title="CTEDGE", bind_address=(source, 0))


def _echo(port: int, source: str = LOOPBACK) -> bool:
    """A C-ECHO from ``source``: whether it got an association and a success."""
    assoc = _associate(port, source)
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_half_open_sockets_hold_no_slot_and_are_dropped(tmp_path, serve_model, caplog):
    """As many half-open sockets as there are association slots: a sender still gets in beside
    them; the node drops them all once the negotiation deadline passes, and a sender gets in
    right after others close theirs."""
    caplog.set_level(logging.WARNING, logger="ctedge.edge.serve.guard")
    with running_service(tmp_path, serve_model, associate_seconds=1.0, max_associations=8) as service:
        port = service.node.port
        attackers = [_half_open(port) for _ in range(8)]
        assert _echo(port)  # beside them, not after them
        started = time.monotonic()
        assert all(_closed_by_node(sock, within=3.0) for sock in attackers)
        assert time.monotonic() - started < 2.5
        for sock in attackers:
            sock.close()
        others = [_half_open(port) for _ in range(8)]
        for sock in others:
            sock.close()
        assert _echo(port)  # right after they went
        wait_for(lambda: not service.node.server.gate.connections, timeout=5, what="every connection's slot back")
    assert "connection from 127.0.0.1 dropped: no association within 1 s of connecting" in caplog.text
    assert caplog.text.count("dropped: no association") == 1  # the rest counted, not written one by one


def test_bare_connections_are_dropped_within_the_deadline(tmp_path, serve_model):
    """50 TCP connections that never say anything: those over the per-host connection cap are
    closed at once, the rest at the deadline; then a sender gets in while the 50 are still open
    on the attacker's side. A connection that speaks HTTP is closed at once."""
    with running_service(tmp_path, serve_model, associate_seconds=0.5) as service:
        port, gate = service.node.port, service.node.server.gate
        bare = [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(50)]
        started = time.monotonic()
        assert all(_closed_by_node(sock, within=3.0) for sock in bare)
        assert time.monotonic() - started < 2.0
        assert gate.max_host_connections < 50  # some of them were closed at once
        assert _echo(port)
        for sock in bare:
            sock.close()
        with socket.create_connection((LOOPBACK, port), timeout=5) as http:  # not DICOM at all: closed at once
            http.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _closed_by_node(http, within=0.3)


def test_a_request_that_arrived_whole_is_negotiated_past_the_deadline(tmp_path, serve_model, monkeypatch):
    """The deadline bounds what the peer sends, not the node's own work: a sender whose whole
    A-ASSOCIATE-RQ arrived in time is not dropped when the node (a loaded machine, here a slow
    admission check) negotiates it after the deadline."""
    from ctedge.edge.serve.guard import Gate

    admit = Gate.admit

    def slow_admit(self, assoc):
        time.sleep(0.8)
        return admit(self, assoc)

    monkeypatch.setattr(Gate, "admit", slow_admit)
    with running_service(tmp_path, serve_model, associate_seconds=0.5) as service:
        assert _echo(service.node.port)


def test_associations_are_capped_per_host_and_in_all_and_come_back(tmp_path, serve_model):
    """--max-associations 4 (2 a host): a host's third association is rejected (transient, local
    limit exceeded) while another host gets in; a released slot comes back; a fifth association
    is rejected; idle associations are aborted after --idle-seconds."""
    with running_service(tmp_path, serve_model, allow=[Peer("SCANNER")], max_associations=4,
                         idle_seconds=4) as service:  # long enough for the steps below on a loaded machine
        port = service.node.port
        held = [_associate(port), _associate(port)]
        third = _associate(port)
        assert all(a.is_established for a in held) and third.is_rejected
        rejection = third.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x02, 0x03, 0x02)
        held.append(_associate(port, source="127.0.0.2"))
        assert held[-1].is_established
        held.pop(0).release()
        wait_for(lambda: service.node.server.gate.open_associations() == 2, timeout=5, what="the slot back")
        held += [_associate(port), _associate(port, source="127.0.0.2")]
        assert all(a.is_established for a in held) and len(held) == 4
        assert _associate(port, source="127.0.0.3").is_rejected  # all four slots taken
        wait_for(lambda: all(a.is_aborted for a in held), timeout=10, what="idle associations aborted")
        wait_for(lambda: service.node.server.gate.open_associations() == 0, timeout=5, what="every slot back")


@contextlib.contextmanager
def _peak_rss():
    """The peak growth of this process's resident memory (bytes) while the block runs, sampled every 5 ms."""
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    baseline, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss() - baseline)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def _flood(sock: socket.socket, header: bytes, megabytes: int) -> None:
    """``header``, then up to ``megabytes`` MiB of junk, as fast as the node takes it."""
    sock.settimeout(5)
    chunk = b"\0" * (1 << 20)
    with contextlib.suppress(OSError):
        sock.sendall(header)
        for _ in range(megabytes):
            sock.sendall(chunk)


def test_a_pdu_over_the_limit_is_aborted_before_its_body_is_read(tmp_path, serve_model):
    """A PDU header announcing 1 GiB, followed by 64 MiB: before an association (unauthenticated)
    and inside one, the node sends A-ABORT after the 6-byte header and reads no further; its
    memory grows by a few MB at most. A PDU dribbled a byte at a time is aborted at --idle-seconds."""
    with running_service(tmp_path, serve_model, idle_seconds=1.0) as service, _peak_rss() as growth:
        port = service.node.port
        with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
            _flood(sock, b"\x01\x00" + struct.pack(">L", 1 << 30), 64)
            sock.settimeout(5)
            assert sock.recv(64) == ABORT_INVALID_PDU
        assoc = _associate(port)
        assert assoc.is_established
        _flood(assoc.dul.socket.socket, b"\x04\x00" + struct.pack(">L", 1 << 30), 64)  # a P-DATA-TF of 1 GiB
        wait_for(lambda: assoc.is_aborted, timeout=5, what="the association aborted")
        assert _echo(port)
        slow = _associate(port)
        raw, started = slow.dul.socket.socket, time.monotonic()
        with contextlib.suppress(OSError):
            raw.sendall(b"\x04\x00" + struct.pack(">L", 100))
            while not slow.is_aborted and time.monotonic() - started < 5:
                raw.sendall(b"\0")  # never silent for long, never done
                time.sleep(0.2)
        wait_for(lambda: slow.is_aborted, timeout=2, what="the slow PDU's association aborted")
        assert time.monotonic() - started < 3.0
    assert growth[0] < 16 << 20


def test_an_instance_over_the_size_limit_gets_out_of_resources(tmp_path, serve_model):
    """--max-instance-bytes: a larger instance is answered 0xA700 and not spooled; smaller ones
    in the same association are stored."""
    write_study(tmp_path / "small", np.random.default_rng(1), False, slices=2, size=32, scout=False)
    write_study(tmp_path / "large", np.random.default_rng(2), False, slices=1, size=96, scout=False)
    small, large = study_files(tmp_path / "small"), study_files(tmp_path / "large")
    limit = max(p.stat().st_size for p in small) + 100
    assert all(p.stat().st_size > limit for p in large)
    with running_service(tmp_path, serve_model, max_instance_bytes=limit, quiet_seconds=60) as service:
        assert send_files([small[0], large[0], small[1]], service.node.port) == [0, 0xA700, 0]
        assert service.journal.rows("SELECT instances FROM studies") == [(2,)]


def test_a_capped_buffer_lets_go_of_what_it_held():
    buffer = CappedBuffer(limit=10)
    buffer.write(b"12345678")
    assert buffer.getvalue() == b"12345678" and not buffer.over
    buffer.write(b"90abc")
    buffer.write(b"d" * 1000)
    assert buffer.over and buffer.received == 1013 and buffer.getvalue() == b""
