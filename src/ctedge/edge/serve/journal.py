"""The node's state: one SQLite database in the spool (WAL, synchronous=FULL).

Four tables. ``studies``: one row per StudyInstanceUID (its generated folder name, when
it was created and last heard of, how the last association that sent it ended, what
was answered, classification retries). ``instances``: one row per instance file the
spool holds; a file without a row is an orphan, removed at start. ``answers``: each
answer version with its result JSON and the exact SR and Secondary Capture bytes that
go out, committed in one transaction with its ``deliveries`` (one per result and
destination: pending, sent or failed, attempts, next try, last error). And ``polled``:
what the poll (``--poll``) has seen on the PACS, so it never takes a study twice.

Every transition is one transaction; ``Faults.hit`` follows each commit. Reads and
writes share one connection under one lock (the node's work is small and serial).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ctedge.edge.serve.faults import Faults

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL UNIQUE,
    key TEXT NOT NULL UNIQUE,               -- the generated folder name under studies/
    created REAL NOT NULL,                  -- wall time
    last_arrival REAL NOT NULL,             -- wall time of its last C-STORE (new or duplicate)
    instances INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    association TEXT NOT NULL,              -- the last association that sent it
    association_state TEXT NOT NULL,        -- open, released, aborted, refused, recovered (open at a restart)
    answered_instances INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,     -- answers given
    attempts INTEGER NOT NULL DEFAULT 0,    -- failed classifications of the current instances
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    resent INTEGER NOT NULL DEFAULT 0       -- an answered study was sent again, nothing new in it
);
CREATE INDEX IF NOT EXISTS studies_association ON studies (association);
CREATE INDEX IF NOT EXISTS studies_due ON studies (next_try) WHERE instances > answered_instances OR resent;
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id) ON DELETE CASCADE,
    sop_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    file TEXT NOT NULL,                     -- generated name inside the study's folder
    bytes INTEGER NOT NULL,
    expected INTEGER,                       -- ImagesInAcquisition, when the instance gives it
    association TEXT NOT NULL,
    received REAL NOT NULL,
    UNIQUE (study_id, sop_uid)
);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    instances INTEGER NOT NULL,
    completion TEXT NOT NULL,               -- COMPLETE or PARTIAL
    completion_reason TEXT,
    result TEXT NOT NULL,                   -- the StudyResult as JSON
    error TEXT,                             -- no answer: why
    sr BLOB, sr_uid TEXT,
    sc BLOB, sc_error TEXT,
    created REAL NOT NULL,
    latency_s REAL NOT NULL,
    UNIQUE (study_id, version)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    answer_id INTEGER NOT NULL REFERENCES answers (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,                     -- sr or sc
    destination TEXT NOT NULL,              -- AET@HOST:PORT
    status TEXT NOT NULL,                   -- pending, sent or failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (answer_id, kind, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_unsent ON deliveries (status, next_try) WHERE status != 'sent';
CREATE INDEX IF NOT EXISTS answers_created ON answers (created);
CREATE TABLE IF NOT EXISTS polled (         -- studies the poll has seen on the PACS: never taken twice
    study_uid TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    checked REAL NOT NULL,                  -- when the poll last changed its row
    instances INTEGER,                      -- NumberOfStudyRelatedInstances when last seen
    status TEXT NOT NULL,                   -- waiting, retrieved, held (received otherwise), not eligible, failed
    attempts INTEGER NOT NULL DEFAULT 0,    -- failed retrievals
    detail TEXT                             -- not eligible: the result JSON; failed: the error
);
CREATE INDEX IF NOT EXISTS polled_checked ON polled (checked);
"""
STUDY_COLUMNS = ("id, study_uid, key, created, last_arrival, instances, bytes, association_state, "
                 "answered_instances, version, attempts, next_try, last_error, resent")


@dataclass(frozen=True)
class StudyRow:
    id: int
    study_uid: str
    key: str
    created: float
    last_arrival: float
    instances: int
    bytes: int
    association_state: str
    answered_instances: int
    version: int
    attempts: int
    next_try: float
    last_error: str | None
    resent: int


POLLED_COLUMNS = "study_uid, first_seen, checked, instances, status, attempts, detail"


@dataclass(frozen=True)
class PolledRow:
    """What the poll made of one study it saw on the PACS."""

    study_uid: str
    first_seen: float
    checked: float
    instances: int | None
    status: str
    attempts: int
    detail: str | None


@dataclass(frozen=True)
class NewInstance:
    """One received instance, its file already on disk."""

    study_uid: str
    sop_uid: str
    series_uid: str
    file: str
    bytes: int
    expected: int | None  # ImagesInAcquisition
    association: str


@dataclass(frozen=True)
class AnswerDraft:
    """An answer as the assembler made it, before it is committed."""

    instances: int
    completion: str
    completion_reason: str | None
    result: dict
    error: str | None
    sr: bytes | None
    sr_uid: str | None
    sc: bytes | None
    sc_error: str | None
    latency_s: float


@dataclass(frozen=True)
class Due:
    """A delivery to attempt (its bytes are read when it is sent)."""

    id: int
    study_uid: str
    version: int
    kind: str
    destination: str
    status: str
    attempts: int


class Journal:
    """The database; thread-safe (one lock)."""

    def __init__(self, path: Path, faults: Faults):
        self.path, self.faults = Path(path), faults
        self.lock = threading.RLock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        found = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if found is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(found[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: journal schema {found[0]}, this ctedge reads {SCHEMA_VERSION}")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextmanager
    def write(self, point: str | None) -> Iterator[sqlite3.Connection]:
        """One transaction; ``point`` is hit after its commit."""
        with self.lock:
            self.faults.check()
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.faults.hit("journal.write")
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        if point:
            self.faults.hit(point)

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def value(self, sql: str, args: tuple = ()):
        found = self.rows(sql, args)
        return found[0][0] if found else None

    # --- receiving ------------------------------------------------------------------

    def recover(self) -> int:
        """At start: a study whose association was open when the node stopped is ``recovered``
        (maybe incomplete); every unanswered study gets a full quiet period from now (its
        sender may have been retrying while the node was down). How many were recovered."""
        with self.write(None) as db:
            db.execute("UPDATE studies SET last_arrival=MAX(last_arrival, ?) WHERE instances > answered_instances",
                       (time.time(),))
            return db.execute("UPDATE studies SET association_state='recovered' "
                              "WHERE association_state='open'").rowcount

    def study(self, study_uid: str) -> StudyRow | None:
        found = self.rows(f"SELECT {STUDY_COLUMNS} FROM studies WHERE study_uid=?", (study_uid,))
        return StudyRow(*found[0]) if found else None

    def study_key(self, study_uid: str) -> str | None:
        return self.value("SELECT key FROM studies WHERE study_uid=?", (study_uid,))

    def holds(self, study_uid: str, sop_uid: str) -> bool:
        return self.value("SELECT 1 FROM instances JOIN studies ON studies.id=study_id "
                          "WHERE study_uid=? AND sop_uid=?", (study_uid, sop_uid)) is not None

    def add_instance(self, new: NewInstance, key: str) -> None:
        """Record an instance whose file is on disk (and the study, the first time)."""
        now = time.time()
        with self.write("instance.committed") as db:
            db.execute("INSERT INTO studies (study_uid, key, created, last_arrival, association, association_state) "
                       "VALUES (?, ?, ?, ?, ?, 'open') ON CONFLICT (study_uid) DO NOTHING",
                       (new.study_uid, key, now, now, new.association))
            study_id, held_in = db.execute("SELECT id, key FROM studies WHERE study_uid=?", (new.study_uid,)).fetchone()
            if held_in != key:  # never a row for a file outside its study's folder
                raise RuntimeError(f"study {study_id} lives in {held_in}, not {key}")
            db.execute("INSERT INTO instances (study_id, sop_uid, series_uid, file, bytes, expected, association, "
                       "received) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (study_id, new.sop_uid, new.series_uid, new.file, new.bytes, new.expected, new.association,
                        now))
            db.execute("UPDATE studies SET instances=instances+1, bytes=bytes+?, last_arrival=?, association=?, "
                       "association_state='open', attempts=0, next_try=0, last_error=NULL, resent=0 WHERE id=?",
                       (new.bytes, now, new.association, study_id))

    def add_duplicate(self, study_uid: str, association: str) -> None:
        """An instance the study holds already: the association is this study's last one,
        and an answered study with nothing new is marked re-sent."""
        with self.write(None) as db:
            db.execute("UPDATE studies SET last_arrival=?, association=?, association_state='open', "
                       "resent=(version > 0 AND instances = answered_instances) WHERE study_uid=?",
                       (time.time(), association, study_uid))

    def association_closed(self, association: str, state: str) -> None:
        """The association's studies (those it sent last) take how it ended: released, aborted,
        or refused (some of its instances got 0xA700)."""
        with self.write("association.closed") as db:
            db.execute("UPDATE studies SET association_state=? WHERE association=? AND association_state='open'",
                       (state, association))

    def instance_files(self) -> dict[str, set[str]]:
        """Every study folder the journal knows and the files it holds."""
        files: dict[str, set[str]] = {key: set() for (key,) in self.rows("SELECT key FROM studies")}
        for key, name in self.rows("SELECT key, file FROM instances JOIN studies ON studies.id=study_id"):
            files[key].add(name)
        return files

    # --- answering -----------------------------------------------------------------

    def due_studies(self, now: float) -> list[StudyRow]:
        """Studies with instances not answered yet, or re-sent, whose next try is due."""
        return [StudyRow(*row) for row in self.rows(
            f"SELECT {STUDY_COLUMNS} FROM studies WHERE (instances > answered_instances OR resent) AND next_try <= ? "
            "ORDER BY last_arrival", (now,))]

    def series_counts(self, study_id: int, series_uid: str) -> tuple[int, int | None]:
        """Instances of one series held, and the most ImagesInAcquisition they announce."""
        return self.rows("SELECT COUNT(*), MAX(expected) FROM instances WHERE study_id=? AND series_uid=?",
                         (study_id, series_uid))[0]

    def classify_failed(self, study: StudyRow, next_try: float, error: str) -> None:
        with self.write("classify.failed") as db:
            db.execute("UPDATE studies SET attempts=attempts+1, next_try=?, last_error=? WHERE id=? AND instances=?",
                       (next_try, error, study.id, study.instances))

    def previous_sr(self, study_id: int, version: int) -> bytes | None:
        return self.value("SELECT sr FROM answers WHERE study_id=? AND version=?", (study_id, version))

    def commit_answer(self, study: StudyRow, draft: AnswerDraft, destinations: list[str]) -> int:
        """Answer ``study.version + 1`` with its deliveries, in one transaction; its version.
        A study changed meanwhile (a new instance) raises: it is answered again later."""
        version = study.version + 1
        with self.write("answer.committed") as db:
            changed = db.execute("UPDATE studies SET version=?, answered_instances=?, attempts=0, next_try=0, "
                                 "last_error=NULL, resent=0 WHERE id=? AND version=? AND instances=?",
                                 (version, draft.instances, study.id, study.version, draft.instances)).rowcount
            if changed != 1:
                raise StaleStudy(f"study {study.id} changed while it was answered")
            answer_id = db.execute(
                "INSERT INTO answers (study_id, version, instances, completion, completion_reason, result, error, "
                "sr, sr_uid, sc, sc_error, created, latency_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study.id, version, draft.instances, draft.completion, draft.completion_reason,
                 json.dumps(draft.result, allow_nan=False, default=str), draft.error, draft.sr, draft.sr_uid,
                 draft.sc, draft.sc_error, time.time(), draft.latency_s)).lastrowid
            kinds = [kind for kind, data in (("sr", draft.sr), ("sc", draft.sc)) if data is not None]
            db.executemany("INSERT INTO deliveries (answer_id, kind, destination, status) VALUES (?, ?, ?, 'pending')",
                           [(answer_id, kind, destination) for kind in kinds for destination in destinations])
        return version

    def redeliver(self, study: StudyRow) -> int:
        """A re-sent study: its last answer's deliveries go out again; how many."""
        with self.write("redelivery.queued") as db:
            queued = db.execute("UPDATE deliveries SET status='pending', attempts=0, next_try=0 WHERE answer_id="
                                "(SELECT id FROM answers WHERE study_id=? AND version=?)",
                                (study.id, study.version)).rowcount
            db.execute("UPDATE studies SET resent=0 WHERE id=?", (study.id,))
        return queued

    # --- delivering ----------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[Due]:
        """Deliveries to try now, oldest answer first; one waits while an older version of
        the same study's result is still unsent to that destination (v9 before v10)."""
        return [Due(*row) for row in self.rows(
            "SELECT d.id, s.study_uid, a.version, d.kind, d.destination, d.status, d.attempts "
            "FROM deliveries d JOIN answers a ON a.id=d.answer_id JOIN studies s ON s.id=a.study_id "
            "WHERE d.status != 'sent' AND d.next_try <= ? AND NOT EXISTS ("
            "  SELECT 1 FROM deliveries e JOIN answers b ON b.id=e.answer_id WHERE b.study_id=a.study_id "
            "  AND b.version < a.version AND e.kind=d.kind AND e.destination=d.destination AND e.status != 'sent') "
            "ORDER BY a.created, a.version, d.kind", (now,))]

    def delivery_data(self, delivery_id: int) -> bytes:
        return self.value("SELECT CASE d.kind WHEN 'sr' THEN a.sr ELSE a.sc END FROM deliveries d "
                          "JOIN answers a ON a.id=d.answer_id WHERE d.id=?", (delivery_id,))

    def delivery_sent(self, delivery_id: int) -> None:
        with self.write("delivery.recorded") as db:
            db.execute("UPDATE deliveries SET status='sent', attempts=attempts+1, sent_at=?, last_error=NULL "
                       "WHERE id=?", (time.time(), delivery_id))

    def delivery_failed(self, delivery_id: int, status: str, next_try: float, error: str) -> None:
        with self.write("delivery.recorded") as db:
            db.execute("UPDATE deliveries SET status=?, attempts=attempts+1, next_try=?, last_error=? WHERE id=?",
                       (status, next_try, error, delivery_id))

    def next_delivery(self) -> float | None:
        """When the next unsent delivery is due (None: none)."""
        return self.value("SELECT MIN(next_try) FROM deliveries WHERE status != 'sent'")

    # --- polling -------------------------------------------------------------------------

    def polled(self, study_uid: str) -> PolledRow | None:
        found = self.rows(f"SELECT {POLLED_COLUMNS} FROM polled WHERE study_uid=?", (study_uid,))
        return PolledRow(*found[0]) if found else None

    def poll_seen(self, study_uid: str, instances: int | None, status: str, detail: str | None = None,
                  failed: bool = False) -> None:
        """Record what the poll made of a study (``failed``: one more failed retrieval)."""
        now = time.time()
        with self.write(None) as db:
            db.execute("INSERT INTO polled (study_uid, first_seen, checked, instances, status, attempts, detail) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (study_uid) DO UPDATE SET checked=excluded.checked, "
                       "instances=excluded.instances, status=excluded.status, detail=excluded.detail, "
                       "attempts=attempts+excluded.attempts",
                       (study_uid, now, now, instances, status, int(failed), detail))

    def recent_polled(self, limit: int) -> list[PolledRow]:
        """The poll's last rows that are not a retrieved study (those have answers), newest first."""
        return [PolledRow(*row) for row in self.rows(
            f"SELECT {POLLED_COLUMNS} FROM polled WHERE status NOT IN ('retrieved', 'held') ORDER BY checked DESC "
            "LIMIT ?", (limit,))]

    def meta(self, key: str) -> str | None:
        return self.value("SELECT value FROM meta WHERE key=?", (key,))

    def set_meta(self, key: str, value: str) -> None:
        with self.write(None) as db:
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                       (key, value))

    # --- retention -------------------------------------------------------------------

    def finished_studies(self) -> list[tuple[int, str, float, int]]:
        """(id, key, last arrival, bytes) of answered studies with nothing left to send or
        receive, oldest first: the only ones retention may delete."""
        return self.rows(
            "SELECT id, key, last_arrival, bytes FROM studies s WHERE version > 0 AND instances = answered_instances "
            "AND resent = 0 AND association_state != 'open' AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN answers a "
            "ON a.id=d.answer_id WHERE a.study_id=s.id AND d.status != 'sent') ORDER BY last_arrival")

    def delete_study(self, study_id: int) -> None:
        with self.write("retention.deleted") as db:
            db.execute("DELETE FROM studies WHERE id=?", (study_id,))

    def probe(self) -> None:
        """A small write: does the journal take writes again (after a full disk)?"""
        with self.write(None) as db:
            db.execute("INSERT INTO meta VALUES ('probe', ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                       (str(time.time()),))


class StaleStudy(RuntimeError):
    """The study changed between its classification and its answer's commit."""
