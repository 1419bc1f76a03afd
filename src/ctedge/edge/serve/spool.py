"""Received instances on disk, each acknowledged only after its journal row is committed.

Layout under the spool folder (every name generated here, never taken from a UID):

    lock                          held (fcntl) by the one `ctedge serve` using the spool
    journal.sqlite                the node's state (see journal.py)
    studies/<uuid4>/<uuid4>.dcm   each instance as received (fsync, rename, fsync the folder)

The journal says which files exist: at start, a file or folder it does not list (left
by a kill -9 between a write and its commit) is an orphan and is removed; no state is
ever read from which files exist.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ctedge.core.errors import CtedgeError
from ctedge.core.files import atomic_write, sync_folder
from ctedge.edge.serve.faults import Faults, is_disk_full
from ctedge.edge.serve.journal import Journal, NewInstance

log = logging.getLogger(__name__)


UID_PATTERN = re.compile(r"\b\d+(?:\.\d+){3,}\b")  # a DICOM UID inside a message


def uid_hash(uid: str) -> str:
    """What logs show instead of a UID: 12 hex digits of its sha256."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def hash_uids(text: str) -> str:
    """A message for the log or the status page, with every UID in it hashed."""
    return UID_PATTERN.sub(lambda match: "uid:" + uid_hash(match.group()), text)


def durable_move(source: Path, path: Path) -> None:
    """Move a file already written under the spool (a STOW-RS part, a pulled instance) to
    ``path`` as ``atomic_write`` leaves a file: fsync, rename, fsync the folder."""
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(source, path)
    sync_folder(path.parent)


class Stored(Enum):
    """What became of one received instance (the node maps it to a DIMSE status)."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOPInstanceUID already held: counted once
    STUDY_FULL = "study over its instance limit"
    DISK_LOW = "disk below the free-space minimum"
    PAUSED = "node paused: a write failed for lack of space"


@dataclass(frozen=True)
class Incoming:
    """One received instance and what its header says: its bytes (a C-STORE's dataset), or a
    file under the spool that is moved into place (a STOW-RS part, a pulled instance)."""

    study_uid: str
    sop_uid: str
    series_uid: str
    expected: int | None  # ImagesInAcquisition
    data: bytes | None = None
    path: Path | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else Path(self.path).stat().st_size


def lock_spool(root: Path) -> int:
    """Hold the spool's lock (one spool, one process); its file descriptor. Another holder:
    an error naming it (pid, host)."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise
        raise CtedgeError(f"{root} is in use by another `ctedge serve` ({holder}); one spool, one process",
                          param="spool") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def check_layout(root: Path) -> None:
    """Refuse a spool written by a ctedge before the journal (state.json, outbox/)."""
    if (root / "outbox").is_dir() or next((root / "studies").glob("*/study.json"), None) is not None:
        raise CtedgeError(f"{root} holds a spool of an older ctedge (outbox/, studies/*/state.json), which this "
                          "version does not read: move it aside (its unsent results are in outbox/) and start on an "
                          "empty folder", param="spool")


class Spool:
    """The study folders and the journal; ``store`` is called from the node's threads."""

    def __init__(self, root: Path, max_study_instances: int, min_free_disk: int, pause, faults: Faults | None = None):
        self.root = Path(root)
        self.max_study_instances, self.min_free_disk, self.pause = max_study_instances, min_free_disk, pause
        self.faults = faults or Faults()
        try:
            (self.root / "studies").mkdir(parents=True, exist_ok=True)
            check_layout(self.root)
            self.lock_fd: int | None = lock_spool(self.root)
        except OSError as exc:
            raise CtedgeError(f"{self.root} can't be used as a spool ({exc.strerror or exc})", param="spool") from None
        try:
            self.journal = Journal(self.root / "journal.sqlite", self.faults)
        except (OSError, sqlite3.Error) as exc:
            os.close(self.lock_fd)
            raise CtedgeError(f"{self.root / 'journal.sqlite'} can't be opened ({exc})", param="spool") from None
        self.lock = threading.Lock()
        self.written = threading.Condition(self.lock)  # an instance's write ended
        self.keys: dict[str, str] = {}  # study UID -> folder name given in this process
        self.arriving: dict[str, set[str]] = {}  # study UID -> SOP instance UIDs being written
        self.unrecorded: dict[str, str] = {}  # association -> how it ended, not in the journal yet
        self._recover()

    def close(self) -> None:
        """Close the journal and let go of the spool's lock (once)."""
        if self.lock_fd is not None:
            self.journal.close()
            os.close(self.lock_fd)
            self.lock_fd = None

    def folder(self, key: str) -> Path:
        return self.root / "studies" / key

    def _recover(self) -> None:
        """Orphans (files the journal does not list) removed; open associations marked recovered."""
        known = self.journal.instance_files()
        orphans = 0
        for folder in (self.root / "studies").iterdir():
            names = known.get(folder.name)
            if names is None:
                shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
                orphans += 1
                continue
            for path in folder.iterdir():
                if path.name not in names:
                    path.unlink()
                    orphans += 1
        missing = sum(not (self.folder(key) / name).exists() for key, names in known.items() for name in names)
        recovered = self.journal.recover()
        if orphans or recovered:
            log.info("spool %s: %d orphan file(s) removed; %d stud(ies) were being received when the node stopped",
                     self.root, orphans, recovered)
        if missing:
            log.error("spool %s: %d instance file(s) the journal lists are missing (removed by hand?)", self.root,
                      missing)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def busy(self, study_uid: str) -> bool:
        """Whether an instance of the study is being written now."""
        with self.lock:
            return bool(self.arriving.get(study_uid))

    def store(self, incoming: Incoming, association: str) -> Stored:
        """Write one instance and commit its row (or say why not); only then may it be acknowledged."""
        self.faults.check()
        if self.pause.paused:
            return Stored.PAUSED
        with self.written:
            while incoming.sop_uid in self.arriving.get(incoming.study_uid, ()):
                self.written.wait()  # another copy is being written: its outcome decides
            duplicate = self.journal.holds(incoming.study_uid, incoming.sop_uid)
            if not duplicate:
                refused = self._refusal(incoming, len(self.arriving.get(incoming.study_uid, ())))
                if refused is not None:
                    return refused
                key = self.keys.get(incoming.study_uid) or self.journal.study_key(incoming.study_uid)
                if key is None:
                    key = self.keys[incoming.study_uid] = uuid.uuid4().hex
                    self.folder(key).mkdir()
                    sync_folder(self.folder(key).parent)
                self.arriving.setdefault(incoming.study_uid, set()).add(incoming.sop_uid)
        if duplicate:
            self.journal.add_duplicate(incoming.study_uid, association)
            return Stored.DUPLICATE
        try:
            return self._write(incoming, association, key)
        finally:
            with self.written:
                arriving = self.arriving[incoming.study_uid]
                arriving.discard(incoming.sop_uid)
                if not arriving:
                    del self.arriving[incoming.study_uid]
                self.written.notify_all()

    def _refusal(self, incoming: Incoming, arriving: int) -> Stored | None:
        held = self.journal.value("SELECT instances FROM studies WHERE study_uid=?", (incoming.study_uid,)) or 0
        if held + arriving >= self.max_study_instances:
            return Stored.STUDY_FULL
        if self.free_bytes() - incoming.size < self.min_free_disk:
            return Stored.DISK_LOW
        return None

    def _write(self, incoming: Incoming, association: str, key: str) -> Stored:
        name = f"{uuid.uuid4().hex}.dcm"
        path = self.folder(key) / name
        try:
            size = incoming.size
            if incoming.data is not None:
                atomic_write(incoming.data, path, fresh_name=True)
            else:
                durable_move(incoming.path, path)
            self.faults.hit("instance.written")
            self.journal.add_instance(NewInstance(incoming.study_uid, incoming.sop_uid, incoming.series_uid, name,
                                                  size, incoming.expected, association), key)
            with self.lock:
                self.keys.pop(incoming.study_uid, None)  # the journal has it now
        except BaseException as exc:
            if not self.faults.dead.is_set():  # a crash leaves its orphan, as kill -9 would
                path.unlink(missing_ok=True)
            if is_disk_full(exc):
                self.pause.set(f"cannot write the spool ({exc})")
                return Stored.PAUSED
            raise
        return Stored.STORED

    def association_closed(self, association: str, state: str) -> None:
        """Record how an association ended (released, aborted, refused); one that can't be
        recorded now (a full disk) is kept and recorded by ``record_closes``."""
        try:
            self.journal.association_closed(association, state)
        except Exception as exc:
            if self.faults.dead.is_set():
                raise
            with self.lock:
                self.unrecorded[association] = state
            if is_disk_full(exc):
                self.pause.set(f"cannot write the journal ({exc})")
            log.error("association end not recorded yet (%s); tried again", exc.__class__.__name__)

    def record_closes(self) -> None:
        """Record association ends that could not be recorded when they happened."""
        with self.lock:
            waiting = dict(self.unrecorded)
        for association, state in waiting.items():
            self.journal.association_closed(association, state)
            with self.lock:
                self.unrecorded.pop(association, None)

    def remove(self, study_id: int, study_uid: str, key: str) -> bool:
        """Delete a study's rows, then its files (retention); False when it is receiving now."""
        with self.lock:
            if self.arriving.get(study_uid):
                return False
            self.journal.delete_study(study_id)
            self.keys.pop(study_uid, None)
        shutil.rmtree(self.folder(key), ignore_errors=True)
        return True
