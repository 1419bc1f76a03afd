"""Received instances on disk, durable before they are acknowledged.

Layout under the spool folder (every name generated here, never taken from a UID):

    studies/<uuid4>/study.json         the StudyInstanceUID and when the folder was made
    studies/<uuid4>/instances/<uuid4>.dcm   each instance as received (fsync, then rename)
    studies/<uuid4>/state.json         the last answer: instances it saw, its version
    results/<uuid4>-v<N>.dcm           the SR of answer N (kept to supersede it later)
    outbox/                            results not yet sent (see outbox.py)

A kill -9 at any moment leaves only whole files (a temp file at worst, removed at the
next start); a restart rebuilds the index from the folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


UID_PATTERN = re.compile(r"\b\d+(?:\.\d+){3,}\b")  # a DICOM UID inside a message


def uid_hash(uid: str) -> str:
    """What logs show instead of a UID: 12 hex digits of its sha256."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def hash_uids(text: str) -> str:
    """A message for the log or the status page, with every UID in it hashed."""
    return UID_PATTERN.sub(lambda match: "uid:" + uid_hash(match.group()), text)


def durable_write(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, and
    the new one is on disk when this returns: temp file, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Stored(Enum):
    """What became of one received instance (the node maps it to a DIMSE status)."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOPInstanceUID already held: counted once
    STUDY_FULL = "study over its instance limit"
    DISK_LOW = "disk below the free-space minimum"


@dataclass
class SpooledStudy:
    """One StudyInstanceUID's folder and what the node knows about it."""

    study_uid: str
    folder: Path
    sop_uids: set[str] = field(default_factory=set)  # received or being written
    written: int = 0  # instances on disk (what an answer can see)
    last_arrival: float = 0.0  # time.monotonic() of the last new instance on disk
    answered_instances: int = 0  # instances the last answer saw (0: none yet)
    version: int = 0  # answers given so far
    queued: bool = False  # a classification is waiting for or on the worker
    speculation: Any = None  # (instances, Answer) classified during the quiet period, not yet sent

    @property
    def instances(self) -> Path:
        return self.folder / "instances"

    @property
    def key(self) -> str:
        """The folder's generated name: the study's id in results and the outbox."""
        return self.folder.name

    def needs_answer(self) -> bool:
        return self.written > self.answered_instances and len(self.sop_uids) == self.written

    def to_classify(self, silent_for: float, now: float) -> bool:
        """Silent long enough to classify speculatively, and not classified as it is."""
        return (not self.queued and self.needs_answer() and now - self.last_arrival >= silent_for
                and (self.speculation is None or self.speculation[0] != self.written))

    def to_send(self, quiet_seconds: float, now: float) -> bool:
        """Complete (quiet for the full period) and already classified as it is."""
        return (self.needs_answer() and now - self.last_arrival >= quiet_seconds
                and self.speculation is not None and self.speculation[0] == self.written)


class Spool:
    """The index of spooled studies; thread-safe."""

    def __init__(self, root: Path, max_study_instances: int, min_free_disk: int):
        self.root = Path(root)
        self.max_study_instances, self.min_free_disk = max_study_instances, min_free_disk
        self.lock = threading.Lock()
        self.studies: dict[str, SpooledStudy] = {}
        for sub in ("studies", "results", "outbox"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        """Rebuild the index after a restart; temp files of a killed writer are removed."""
        import pydicom

        now = time.monotonic()
        for meta in sorted((self.root / "studies").glob("*/study.json")):
            folder = meta.parent
            study = SpooledStudy(json.loads(meta.read_text())["study_uid"], folder, last_arrival=now)
            for tmp in folder.glob("**/.*.tmp"):
                tmp.unlink()
            for path in (folder / "instances").glob("*.dcm"):
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                study.sop_uids.add(str(ds.SOPInstanceUID))
                study.written += 1
            state = folder / "state.json"
            if state.exists():
                saved = json.loads(state.read_text())
                study.answered_instances, study.version = saved["answered_instances"], saved["version"]
            self.studies[study.study_uid] = study
        if self.studies:
            log.info("spool %s: %d stud(ies), %d instance(s) recovered", self.root, len(self.studies),
                     sum(len(s.sop_uids) for s in self.studies.values()))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def store(self, study_uid: str, sop_uid: str, data: bytes) -> Stored:
        """Write one instance durably (or say why not); only then may it be acknowledged."""
        with self.lock:
            study = self.studies.get(study_uid)
            if study is not None and sop_uid in study.sop_uids:
                return Stored.DUPLICATE
            if study is not None and len(study.sop_uids) >= self.max_study_instances:
                return Stored.STUDY_FULL
            if self.free_bytes() - len(data) < self.min_free_disk:
                return Stored.DISK_LOW
            if study is None:
                study = self._new_study(study_uid)
            study.sop_uids.add(sop_uid)  # reserved now; another copy arriving meanwhile is a duplicate
        try:
            durable_write(data, study.instances / f"{uuid.uuid4().hex}.dcm")
        except BaseException:
            with self.lock:
                study.sop_uids.discard(sop_uid)
            raise
        with self.lock:
            study.written += 1
            study.last_arrival = time.monotonic()
        return Stored.STORED

    def _new_study(self, study_uid: str) -> SpooledStudy:
        folder = self.root / "studies" / uuid.uuid4().hex
        (folder / "instances").mkdir(parents=True)
        durable_write(json.dumps({"study_uid": study_uid, "created": time.time()}).encode(), folder / "study.json")
        sync_folder(folder.parent)
        now = time.monotonic()
        study = self.studies[study_uid] = SpooledStudy(study_uid, folder, last_arrival=now)
        return study

    def to_classify(self, silent_for: float) -> list[SpooledStudy]:
        """Studies to classify now; each is marked queued (``release`` clears it)."""
        now = time.monotonic()
        with self.lock:
            ready = [s for s in self.studies.values() if s.to_classify(silent_for, now)]
            for study in ready:
                study.queued = True
        return ready

    def to_send(self, quiet_seconds: float) -> list[SpooledStudy]:
        now = time.monotonic()
        with self.lock:
            return [s for s in self.studies.values() if s.to_send(quiet_seconds, now)]

    def release(self, study: SpooledStudy, speculation=None) -> None:
        with self.lock:
            study.queued = False
            if speculation is not None:
                study.speculation = speculation

    def save_answer(self, study: SpooledStudy, instances: int, version: int, summary: dict) -> None:
        """Record that answer ``version`` covered ``instances`` instances (after its SR is in the outbox)."""
        durable_write(json.dumps({"answered_instances": instances, "version": version, "summary": summary},
                                 allow_nan=False).encode(), study.folder / "state.json")
        with self.lock:
            study.answered_instances, study.version, study.speculation = instances, version, None

    def saved_summary(self, study: SpooledStudy) -> dict | None:
        state = study.folder / "state.json"
        return json.loads(state.read_text()).get("summary") if state.exists() else None

    def result_path(self, study: SpooledStudy, version: int) -> Path:
        return self.root / "results" / f"{study.key}-v{version}.dcm"
