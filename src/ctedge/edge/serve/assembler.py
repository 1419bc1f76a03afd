"""Studies become answers: a quiet period ends a study, one worker classifies it, its SR
goes to the outbox. The worker also runs the HTTP API's requests (one model, one queue).
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
from ctedge.edge.serve.pipeline import Answer, classify_spooled
from ctedge.edge.serve.spool import Spool, SpooledStudy, durable_write, hash_uids, uid_hash
from ctedge.edge.serve.sr import Algorithm, build_sr, sr_bytes
from ctedge.edge.study import StudyResult

log = logging.getLogger(__name__)


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


@dataclass
class StudyRecord:
    """What the status page, /v1/studies/{uid} and the metrics know of one answer."""

    study_uid: str
    finished: float  # time.time()
    version: int
    instances: int
    summary: dict  # the StudyResult as a dict (with sop_instance_uid on the top slices)
    latency_s: float  # last instance -> SR in the outbox
    sent: bool = False


class Assembler:
    """Watches the spool: a study silent for ``SPECULATE_AFTER_S`` is classified on the worker
    while its quiet period runs; when the period ends with no new instance, only the SR and
    the sending remain. A new instance meanwhile discards that classification."""

    SPECULATE_AFTER_S = 1.0

    def __init__(self, spool: Spool, worker: Worker, outbox, clf, options, algorithm: Algorithm,
                 quiet_seconds: float, on_answer: Callable[[StudyRecord], None], log_phi: bool = False,
                 secondary_capture: bool = False):
        self.spool, self.worker, self.outbox, self.clf = spool, worker, outbox, clf
        self.options, self.algorithm, self.quiet_seconds, self.on_answer = options, algorithm, quiet_seconds, on_answer
        self.silent_for = min(quiet_seconds, self.SPECULATE_AFTER_S)
        self.log_phi, self.secondary_capture = log_phi, secondary_capture
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="ctedge-assembler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

    def _watch(self) -> None:
        tick = min(0.05, max(self.quiet_seconds / 4, 0.01))
        while not self.stopping.wait(tick):
            for study in self.spool.to_classify(self.silent_for):
                try:
                    self.worker.submit(lambda study=study: self.classify(study))
                except QueueFull:  # the study waits for the next tick; nothing is dropped
                    self.spool.release(study)
            for study in self.spool.to_send(self.quiet_seconds):
                self.answer(study)

    def classify(self, study: SpooledStudy) -> None:
        """Worker job: classify the study as it is on disk now (kept until it is complete)."""
        instances, answer = study.written, None
        try:
            answer = classify_spooled(self.clf, study.instances, study.study_uid, self.options)
        except Exception as exc:  # a bug: that study's error, not a retry loop
            log.exception("study %s: classification failed", uid_hash(study.study_uid))
            answer = Answer(StudyResult(input=study.study_uid, study_uid=study.study_uid,
                                        error=f"internal error ({exc.__class__.__name__}: {exc})"))
        finally:
            self.spool.release(study, (instances, answer) if answer else None)

    def answer(self, study: SpooledStudy) -> StudyRecord:
        """A complete, classified study: its SR into the outbox, then the answer recorded."""
        instances, answer = study.speculation
        version, last_arrival = study.version + 1, study.last_arrival
        result = self._send(study, answer, version)
        summary = result.to_dict()
        self.spool.save_answer(study, instances, version, summary)
        latency = time.monotonic() - last_arrival
        record = StudyRecord(study.study_uid, time.time(), version, instances, summary, latency)
        if version > 1:
            log.info("study %s: answer v%d supersedes v%d (%d instance(s) now)", uid_hash(study.study_uid),
                     version, version - 1, instances)
        log.info("study %s%s: %d instance(s), %s, %.2f s after its last instance", uid_hash(study.study_uid),
                 f" (PatientID {result.patient_id})" if self.log_phi else "", instances,
                 f"error: {hash_uids(result.error)}" if result.error else
                 f"P={result.probability:.4f} {result.label} from {result.slices_used} slice(s)", latency)
        self.on_answer(record)
        return record

    def _send(self, study: SpooledStudy, answer: Answer, version: int) -> StudyResult:
        """The StudyResult; when it has an answer, its SR is in the outbox on return."""
        result = answer.result
        if result.error is not None:
            return result
        try:
            previous = self.spool.result_path(study, version - 1)
            sr = build_sr(result, answer.evidence, self.algorithm, study.key, version,
                          previous.read_bytes() if previous.exists() else None)
            data = sr_bytes(sr)
            durable_write(data, self.spool.result_path(study, version))
            self.outbox.put(f"{study.key}-v{version}", data)
            if self.secondary_capture:
                capture = build_capture(result, answer.evidence, self.algorithm, study.key, version)
                self.outbox.put(f"{study.key}-v{version}-sc", sr_bytes(capture))
        except Exception as exc:  # an SR highdicom refuses: that study's error
            log.exception("study %s: no SR", uid_hash(study.study_uid))
            result = replace(result, error=f"no SR could be built ({exc.__class__.__name__}: {exc})")
        return result
