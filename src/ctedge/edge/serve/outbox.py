"""Results on their way to the PACS: persisted, sent by C-STORE, retried with backoff.

Each entry is two files under ``outbox/``: ``NAME.dcm`` (the SR) and ``NAME.json``
(destinations still to reach, attempts, next try). Both are written durably before
the answer is recorded, so an entry survives a kill -9 and is sent after the restart.
An entry that exhausted its retries moves to ``outbox/failed/`` (said in the log).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ctedge.edge.serve.config import Destination
from ctedge.edge.serve.spool import durable_write

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 300.0


@dataclass
class Entry:
    name: str
    pending: list[str]  # destinations (AET@HOST:PORT) not reached yet
    attempts: int = 0
    next_try: float = 0.0  # time.time()
    errors: list[str] = field(default_factory=list)


class Outbox:
    """The queue of unsent results and the thread that sends them."""

    def __init__(self, folder: Path, destinations: list[Destination], ae_title: str, retries: int,
                 retry_seconds: float, on_sent=None):
        self.folder = Path(folder)
        self.failed_folder = self.folder / "failed"
        self.failed_folder.mkdir(parents=True, exist_ok=True)
        self.destinations = {str(d): d for d in destinations}
        self.ae_title, self.retries, self.retry_seconds = ae_title, retries, retry_seconds
        self.on_sent = on_sent or (lambda name: None)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink()

    def put(self, name: str, data: bytes) -> bool:
        """Add a result for every destination (replacing an entry of the same name); False
        when there is no destination to send it to."""
        if not self.destinations:
            return False
        durable_write(data, self.folder / f"{name}.dcm")
        self._save(Entry(name, list(self.destinations)))
        self.wake.set()
        return True

    def _save(self, entry: Entry) -> None:
        durable_write(json.dumps(entry.__dict__).encode(), self.folder / f"{entry.name}.json")

    def entries(self) -> list[Entry]:
        out = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                out.append(Entry(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):  # removed meanwhile by the sender
                continue
        return out

    def pending(self) -> int:
        return len(self.entries())

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="ctedge-outbox", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread:
            self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stopping.is_set():
            waits = []
            for entry in self.entries():
                try:
                    waits.append(self._attempt(entry))
                except Exception:  # a bug or a disk error: logged, the sender goes on
                    log.exception("outbox entry %s", entry.name)
                    waits.append(self.retry_seconds)
            self.wake.wait(timeout=min([w for w in waits if w is not None] + [1.0]))
            self.wake.clear()

    def _attempt(self, entry: Entry) -> float | None:
        """Send one entry if due; the seconds until its next try (None when done)."""
        now = time.time()
        if entry.next_try > now:
            return entry.next_try - now
        data = (self.folder / f"{entry.name}.dcm").read_bytes()
        for target in list(entry.pending):
            destination = self.destinations.get(target)
            error = send(data, destination, self.ae_title) if destination else "destination no longer configured"
            if error is None:
                entry.pending.remove(target)
                log.info("result %s sent to %s", entry.name, target)
            else:
                entry.errors = (entry.errors + [f"{target}: {error}"])[-5:]
        if not entry.pending:
            (self.folder / f"{entry.name}.json").unlink()
            (self.folder / f"{entry.name}.dcm").unlink()
            self.on_sent(entry.name)
            return None
        entry.attempts += 1
        if entry.attempts >= self.retries:
            for suffix in (".dcm", ".json"):
                (self.folder / f"{entry.name}{suffix}").replace(self.failed_folder / f"{entry.name}{suffix}")
            log.error("result %s not sent after %d attempts, moved to %s (%s)", entry.name, entry.attempts,
                      self.failed_folder, entry.errors[-1])
            return None
        backoff = min(self.retry_seconds * 2 ** (entry.attempts - 1), MAX_BACKOFF_S)
        entry.next_try = now + backoff
        self._save(entry)
        log.warning("result %s: %s; attempt %d of %d, next in %.0f s", entry.name, entry.errors[-1],
                    entry.attempts, self.retries, backoff)
        return backoff


def send(data: bytes, destination: Destination, ae_title: str, timeout: float = 30.0) -> str | None:
    """C-STORE one DICOM file to a destination; None on success, else the reason."""
    import pydicom
    from pynetdicom import AE

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        sop_class, syntax = ds.SOPClassUID, ds.file_meta.TransferSyntaxUID
    except Exception as exc:  # a damaged outbox file: reported, retried, set aside like any failure
        return f"unreadable result file ({exc.__class__.__name__})"
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return "association rejected or no answer" if assoc.is_rejected else "association failed (no answer)"
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if not status or "Status" not in status:
        return "no C-STORE response"
    if status.Status not in (0x0000, 0xB000, 0xB006, 0xB007):
        return f"C-STORE status 0x{status.Status:04X}"
    return None
