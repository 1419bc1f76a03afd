"""One `ctedge serve` process: the spool and its journal, the node, the worker, and the
loops (assembler, outbox, disk watcher, retention) under a supervisor; metrics and
readiness read the journal and the loops' states."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from ctedge import __version__
from ctedge.core.files import file_digest
from ctedge.edge.serve import views
from ctedge.edge.serve.assembler import Answered, Assembler, Timing, Worker
from ctedge.edge.serve.config import ServeConfig
from ctedge.edge.serve.disk import DiskWatch, Pause
from ctedge.edge.serve.faults import Faults
from ctedge.edge.serve.node import Node
from ctedge.edge.serve.outbox import Outbox, client_tls
from ctedge.edge.serve.poll import Poller, poll_source
from ctedge.edge.serve.retention import Retention
from ctedge.edge.serve.spool import Spool, hash_uids, uid_hash
from ctedge.edge.serve.sr import Algorithm
from ctedge.edge.serve.supervisor import Loop, Supervisor
from ctedge.edge.study import STUDY_HINT, StudyOptions

log = logging.getLogger(__name__)
RECENT = 50  # answers the status page lists


class Metrics:
    """Prometheus metrics in a registry of their own (several services may share a process)."""

    def __init__(self, queue_length, counts, paused):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.instances = Counter("ctedge_instances_received", "DICOM instances received (stored, "
                                 "duplicate or refused)", registry=self.registry)
        self.answered = Counter("ctedge_studies_answered", "Studies answered", registry=self.registry)
        self.failed = Counter("ctedge_studies_failed", "Studies without an answer (error)", registry=self.registry)
        self.not_eligible = Counter("ctedge_studies_not_eligible", "Studies with no series the rules accept (no "
                                    "answer, not an error)", registry=self.registry)
        self.partial = Counter("ctedge_studies_partial", "Studies answered as PARTIAL (maybe incomplete)",
                               registry=self.registry)
        self.latency = Histogram("ctedge_answer_latency_seconds", "Last instance received -> answer committed "
                                 "(includes the quiet period)", registry=self.registry,
                                 buckets=(0.5, 1, 2, 5, 7.5, 10, 15, 30, 60, 120))
        self.http_requests = Counter("ctedge_http_classifications", "HTTP classification requests answered",
                                     ["endpoint"], registry=self.registry)
        Gauge("ctedge_queue_length", "Jobs waiting for or on the worker", registry=self.registry
              ).set_function(queue_length)
        Gauge("ctedge_outbox_pending", "Results not yet sent, still in their quick retries", registry=self.registry
              ).set_function(lambda: counts()["pending"])
        Gauge("ctedge_results_failed", "Results not sent after their quick retries (tried again until sent)",
              registry=self.registry).set_function(lambda: counts()["failed"])
        Gauge("ctedge_paused", "1 while a full disk pauses the node", registry=self.registry).set_function(paused)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """Everything one `ctedge serve` runs, started and stopped together."""

    def __init__(self, config: ServeConfig, faults: Faults | None = None):
        self.config, self.faults, self.pause = config, faults or Faults.from_environment(), Pause()
        self.spool = Spool(config.spool, config.max_study_instances, config.min_free_disk, self.pause, self.faults)
        try:
            self._build(config)
        except BaseException:
            self.spool.close()
            raise
        self.started = False

    def _build(self, config: ServeConfig) -> None:
        from ctedge.edge.runtime import Classifier

        self.journal = self.spool.journal
        self.clf = Classifier(config.model, config.provider, config.threads, runtime=config.runtime,
                              precision=config.precision, hint=STUDY_HINT)
        self.options = StudyOptions(max_slices=config.max_slices, rules=config.rules)
        self.algorithm = Algorithm("ctedge " + config.model.stem, __version__, file_digest(config.model),
                                   self.clf.threshold)
        self.errors: deque[str] = deque(maxlen=20)
        self.lock = threading.Lock()
        self.worker = Worker(config.queue_size)
        self.metrics = Metrics(self.worker.length, lambda: views.counts(self.journal), lambda: int(self.pause.paused))
        self.node = Node(config, self.spool, on_received=self.metrics.instances.inc)
        timing = Timing(config.quiet_seconds, config.incomplete_seconds, config.no_partial, config.classify_retries,
                        config.retry_seconds)
        self.assembler = Assembler(self.spool, self.worker, self.clf, self.options, self.algorithm, timing,
                                   [str(d) for d in config.destination], self.pause, self._answered, config.log_phi,
                                   config.secondary_capture)
        self.outbox = Outbox(self.journal, config.destination, config.ae_title, config.retries, config.retry_seconds,
                             config.retry_failed_every, self.pause, self.faults,
                             client_tls(config.destination_tls_ca, config.destination_tls_cert,
                                        config.destination_tls_key), config.destination_timeout, self._error,
                             web_auth(config))
        self.disk = DiskWatch(config.spool, self.journal, self.pause, config.min_free_disk, config.disk_check_seconds)
        self.retention = Retention(self.spool, config.keep_days, config.max_spool, config.retention_seconds)
        self.poller = None
        if config.poll:
            source = poll_source(config.poll, config.ae_title, web_auth(config), config.max_study_bytes,
                                 config.max_study_instances, config.destination_timeout)
            self.poller = Poller(self.spool, source, config.rules, config.poll_every, self.pause,
                                 self.metrics.not_eligible.inc, config.poll_since)
        self.loops = {name: Loop(name, step) for name, step in (
            ("assembler", self.assembler.step), ("outbox", self.outbox.step), ("disk", self.disk.step),
            ("retention", self.retention.step), *((("poll", self.poller.step),) if self.poller else ()))}
        self.supervisor = Supervisor(list(self.loops.values()), backoff=config.loop_restart_seconds)

    def _error(self, message: str) -> None:
        """A line for the status page's errors (no patient data: UIDs hashed)."""
        with self.lock:
            self.errors.appendleft(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {hash_uids(message)}")

    def _answered(self, answered: Answered) -> None:
        self.loops["outbox"].wake()
        if answered.result.error:
            self.metrics.failed.inc()
            self._error(f"study {uid_hash(answered.study_uid)}: {answered.result.error}")
            return
        if answered.result.not_eligible:
            self.metrics.not_eligible.inc()
            return
        self.metrics.answered.inc()
        self.metrics.latency.observe(answered.latency_s)
        if answered.completion == "PARTIAL":
            self.metrics.partial.inc()

    def recent_errors(self) -> list[str]:
        with self.lock:
            return list(self.errors)

    def study_view(self, study_uid: str) -> tuple[int, dict | None]:
        return views.study_view(self.journal, study_uid, self.assembler.waiting)

    def readiness(self) -> tuple[bool, dict]:
        """Whether the node takes studies and answers them, and every reason it does not."""
        reasons = []
        if not self.started:
            reasons.append("not started")
        if not self.worker.thread.is_alive():
            reasons.append("the classification worker is not running")
        reasons += [f"the {name} loop is not running" for name in self.supervisor.healthy()]
        pause = self.pause.to_dict()
        if pause["paused"]:
            reasons.append(f"paused: {pause['reason']}")
        if self.disk.low():
            reasons.append("free disk below --min-free-disk: C-STOREs are refused")
        last_error = self.assembler.last_error or self.outbox.last_error
        document = {"ready": not reasons, "reasons": reasons, "loops": self.supervisor.states(),
                    "disk": self.disk.to_dict(), "pause": pause, "last_error": last_error}
        if self.poller is not None:
            document["poll"] = poll = self.poller.to_dict()
            if poll["failing"]:
                reasons.append(f"the poll of {poll['source']} fails: {poll['failing']}")
        document["ready"] = not reasons
        return not reasons, document

    def start(self) -> None:
        self.disk.step()
        self.worker.start()
        self.supervisor.start()
        self.node.start()
        self.started = True

    def stop(self) -> None:
        self.started = False
        self.node.stop()
        self.supervisor.stop()
        self.worker.stop()
        self.outbox.close()
        if self.poller is not None:
            self.poller.source.close()
        self.spool.close()


def web_auth(config: ServeConfig) -> dict:
    """The credentials for the node's DICOMweb peers (DicomWebSource's keywords)."""
    return {"token": config.dicomweb_token, "user": config.dicomweb_user, "password": config.dicomweb_password}
