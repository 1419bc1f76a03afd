"""Studies become answers. The assembler loop goes over the journal's due studies, each in
its own try/except: a study silent for ``SPECULATE_AFTER_S`` is classified on the worker
while its quiet period runs; at the period's end it is answered if it is complete, and
waits (``incomplete_seconds``) if it may not be. The worker also runs the HTTP API's
requests (one model, one queue).

A study may be incomplete when the last association that sent it was aborted, had
instances refused (0xA700), was still open when the node restarted (``recovered``) or is
still open; when its chosen series
has fewer instances than its ImagesInAcquisition; or when its slice positions have a
gap. After ``incomplete_seconds`` it is answered with CompletionFlag PARTIAL (the
reason in the SR, the JSON and the log), or not at all with ``no_partial``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ctedge.edge.serve.capture import build_capture
from ctedge.edge.serve.faults import is_disk_full
from ctedge.edge.serve.journal import AnswerDraft, StaleStudy, StudyRow
from ctedge.edge.serve.pipeline import Answer, classify_spooled
from ctedge.edge.serve.spool import Spool, hash_uids, uid_hash
from ctedge.edge.serve.sr import Algorithm, build_sr, sr_bytes
from ctedge.edge.study import StudyResult

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 300.0


class QueueFull(Exception):
    """The work queue holds ``queue_size`` jobs already."""


class Worker:
    """One thread that runs jobs from a bounded queue (the Classifier is used from it alone)."""

    def __init__(self, size: int):
        self.jobs: queue.Queue = queue.Queue(maxsize=size)
        self.thread = threading.Thread(target=self._run, name="ctedge-worker", daemon=True)
        self.busy = False

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Callable) -> concurrent.futures.Future:
        """Queue ``job``; raises QueueFull rather than wait."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self.jobs.put_nowait((job, future))
        except queue.Full:
            raise QueueFull from None
        return future

    def length(self) -> int:
        return self.jobs.qsize() + int(self.busy)

    def stop(self) -> None:
        self.jobs.put((None, None))
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job, future = self.jobs.get()
            if job is None:
                return
            self.busy = True
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)
            self.busy = False


@dataclass(frozen=True)
class Answered:
    """One committed answer, for the metrics and the log."""

    study_uid: str
    version: int
    instances: int
    result: StudyResult
    completion: str
    latency_s: float


@dataclass(frozen=True)
class Timing:
    """The assembler's periods (seconds) and retries."""

    quiet: float
    incomplete: float
    no_partial: bool = False
    classify_retries: int = 3
    retry_seconds: float = 2.0


class Assembler:
    """The assembler loop's step and the classification jobs it queues."""

    SPECULATE_AFTER_S = 1.0

    def __init__(self, spool: Spool, worker: Worker, clf, options, algorithm: Algorithm, timing: Timing,
                 destinations: list[str], pause, on_answer: Callable[[Answered], None], log_phi: bool = False,
                 secondary_capture: bool = False):
        self.spool, self.journal, self.worker, self.clf, self.options = spool, spool.journal, worker, clf, options
        self.algorithm, self.timing, self.destinations, self.pause = algorithm, timing, destinations, pause
        self.on_answer, self.log_phi, self.secondary_capture = on_answer, log_phi, secondary_capture
        self.silent_for = min(timing.quiet, self.SPECULATE_AFTER_S)
        self.lock = threading.Lock()
        self.classified: dict[int, tuple[int, Answer]] = {}  # study id -> (instances, answer): a cache
        self.queued: set[int] = set()
        self.waiting: dict[int, str] = {}  # study id -> why it may be incomplete (logged once)
        self.last_error: str | None = None

    def step(self) -> float:
        """Look at every due study once; the seconds until the next look."""
        tick = min(0.05, max(self.timing.quiet / 4, 0.01))
        if self.pause.paused:
            return tick
        try:
            self.spool.record_closes()
        except Exception as exc:  # still unwritable: the studies wait for their association's end
            if is_disk_full(exc):
                self.pause.set(f"cannot write the journal ({exc})")
            self.last_error = f"association end not recorded: {exc.__class__.__name__}"
            return tick
        now = time.time()
        for study in self.journal.due_studies(now):
            try:
                self._look_at(study, now)
            except StaleStudy:  # a new instance arrived meanwhile: classified again
                continue
            except Exception as exc:  # that study's problem; the others go on
                if is_disk_full(exc):
                    self.pause.set(f"cannot write the journal ({exc})")
                else:
                    log.exception("study %s: answer failed; tried again", uid_hash(study.study_uid))
                self.last_error = f"study {uid_hash(study.study_uid)}: {exc.__class__.__name__}"
        return tick

    def _look_at(self, study: StudyRow, now: float) -> None:
        if self.spool.busy(study.study_uid) or self.pause.paused:
            return
        silent = now - study.last_arrival
        if study.instances == study.answered_instances:  # sent again, nothing new in it
            if silent < self.timing.quiet or study.association_state == "open":
                return
            if not (study.association_state == "released" and self._last_was_partial(study)):
                queued = self.journal.redeliver(study)
                log.info("study %s sent again with nothing new: answer v%d queued again (%d result(s))",
                         uid_hash(study.study_uid), study.version, queued)
                return
        with self.lock:
            cached, queued = self.classified.get(study.id), study.id in self.queued
        if cached is None or cached[0] != study.instances:
            if silent >= self.silent_for and not queued:
                self._queue(study)
            return
        if silent >= self.timing.quiet:
            self._decide(study, cached[1], silent)

    def _last_was_partial(self, study: StudyRow) -> bool:
        return self.journal.value("SELECT completion FROM answers WHERE study_id=? AND version=?",
                                  (study.id, study.version)) == "PARTIAL"

    def _queue(self, study: StudyRow) -> None:
        with self.lock:
            self.queued.add(study.id)
        try:
            self.worker.submit(lambda: self.classify(study))
        except QueueFull:  # the study waits for the next step; nothing is dropped
            with self.lock:
                self.queued.discard(study.id)

    def classify(self, study: StudyRow) -> None:
        """Worker job: classify the study as the journal counts it now (kept until it is answered)."""
        answer = None
        try:
            answer = classify_spooled(self.clf, self.spool.folder(study.key), study.study_uid, self.options)
        except Exception as exc:  # transient (memory, a file being replaced...): tried again, a few times
            answer = self._failed(study, exc)
        finally:
            with self.lock:
                self.queued.discard(study.id)
                if answer is not None:
                    self.classified[study.id] = (study.instances, answer)

    def _failed(self, study: StudyRow, exc: Exception) -> Answer | None:
        """A classification that raised: tried again later, or after the last try a final error."""
        error = f"internal error ({exc.__class__.__name__}: {exc})"
        attempt = study.attempts + 1
        if attempt >= self.timing.classify_retries:
            log.exception("study %s: classification failed %d time(s); answered with the error",
                          uid_hash(study.study_uid), attempt)
            return Answer(StudyResult(input=study.study_uid, study_uid=study.study_uid, error=error))
        wait = min(self.timing.retry_seconds * 2 ** (attempt - 1), MAX_BACKOFF_S)
        log.warning("study %s: classification failed (%s); try %d of %d in %.0f s", uid_hash(study.study_uid),
                    hash_uids(error), attempt + 1, self.timing.classify_retries, wait)
        try:
            self.journal.classify_failed(study, time.time() + wait, error)
        except Exception as write_error:  # the journal can't be written: the study is looked at again later
            if is_disk_full(write_error):
                self.pause.set(f"cannot write the journal ({write_error})")
            self.last_error = f"study {uid_hash(study.study_uid)}: {write_error.__class__.__name__}"
        return None

    def incomplete(self, study: StudyRow, answer: Answer) -> str | None:
        """Why the study may be incomplete; None when nothing says so."""
        state = study.association_state
        if state != "released":
            return {"aborted": "the sender's association was aborted",
                    "refused": "instances were refused (out of resources) and may come again",
                    "recovered": "the node restarted while the study was being received",
                    "open": "the sender's association is still open"}[state]
        if answer.result.series_uid:
            held, expected = self.journal.series_counts(study.id, answer.result.series_uid)
            if expected and held < expected:
                return f"{held} of {expected} instances (ImagesInAcquisition) received"
        return answer.gaps[0] if answer.gaps else None

    def _decide(self, study: StudyRow, answer: Answer, silent: float) -> None:
        reason = self.incomplete(study, answer)
        if reason is not None and silent < self.timing.incomplete:
            if self.waiting.get(study.id) != reason:
                self.waiting[study.id] = reason
                log.warning("study %s may be incomplete (%s): waiting up to %.0f s for more", uid_hash(study.study_uid),
                            reason, self.timing.incomplete)
            return
        self.waiting.pop(study.id, None)
        self.answer(study, answer, reason)

    def answer(self, study: StudyRow, answer: Answer, incomplete: str | None) -> Answered:
        """The answer's SR and Secondary Capture built, then committed with its deliveries."""
        result = answer.result
        if incomplete is not None:
            result = replace(result, warnings=(*result.warnings, f"incomplete study: {incomplete}"))
            if self.timing.no_partial:
                result = replace(result, error=f"incomplete study ({incomplete}); not answered (--no-partial)")
        version = study.version + 1
        draft = self._draft(study, replace(answer, result=result), version, incomplete)
        self.journal.commit_answer(study, draft, self.destinations if draft.sr else [])
        with self.lock:
            self.classified.pop(study.id, None)
        answered = Answered(study.study_uid, version, study.instances, result, draft.completion, draft.latency_s)
        self._log(answered, draft)
        self.on_answer(answered)
        return answered

    def _draft(self, study: StudyRow, answer: Answer, version: int, incomplete: str | None) -> AnswerDraft:
        result, sr, sr_uid, sc, sc_error = answer.result, None, None, None, None
        if result.error is None and result.not_eligible is None:
            try:
                dataset = build_sr(result, answer.evidence, self.algorithm, version,
                                   self.journal.previous_sr(study.id, study.version), incomplete)
                sr, sr_uid = sr_bytes(dataset), str(dataset.SOPInstanceUID)
            except Exception as exc:  # an SR highdicom refuses: that study's error
                log.exception("study %s: no SR", uid_hash(study.study_uid))
                result = replace(result, error=f"no SR could be built ({exc.__class__.__name__}: {exc})")
        if sr is not None and self.secondary_capture:
            try:
                sc = sr_bytes(build_capture(result, answer.evidence, self.algorithm, version))
            except Exception as exc:  # the SR still goes
                log.exception("study %s: no Secondary Capture (the SR goes without it)", uid_hash(study.study_uid))
                sc_error = f"no Secondary Capture could be built ({exc.__class__.__name__}: {exc})"
        return AnswerDraft(study.instances, "COMPLETE" if incomplete is None else "PARTIAL", incomplete,
                           result.to_dict(), result.error, sr, sr_uid, sc, sc_error,
                           time.time() - study.last_arrival)

    def _log(self, answered: Answered, draft: AnswerDraft) -> None:
        uid, result = uid_hash(answered.study_uid), answered.result
        if answered.version > 1:
            log.info("study %s: answer v%d supersedes v%d (%d instance(s) now)", uid, answered.version,
                     answered.version - 1, answered.instances)
        log.log(logging.WARNING if draft.completion == "PARTIAL" else logging.INFO,
                "study %s%s: %d instance(s), %s%s, %.2f s after its last instance", uid,
                f" (PatientID {result.patient_id})" if self.log_phi else "", answered.instances,
                f"error: {hash_uids(result.error)}" if result.error else
                f"not eligible: {hash_uids(result.not_eligible)}" if result.not_eligible else
                f"P={result.probability:.4f} {result.label} from {result.slices_used} slice(s)",
                f", PARTIAL: {draft.completion_reason}" if draft.completion == "PARTIAL" else "", answered.latency_s)
