"""The node, the worker, the assembler, the outbox and the metrics of one `ctedge serve` process."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from ctedge import __version__
from ctedge.core.files import file_digest
from ctedge.edge.serve.assembler import Assembler, StudyRecord, Worker
from ctedge.edge.serve.config import ServeConfig
from ctedge.edge.serve.node import Node
from ctedge.edge.serve.outbox import Outbox
from ctedge.edge.serve.spool import Spool, hash_uids, uid_hash
from ctedge.edge.serve.sr import Algorithm
from ctedge.edge.study import StudyOptions

log = logging.getLogger(__name__)
RECENT = 50  # answers the status page lists


class Metrics:
    """Prometheus metrics in a registry of their own (several services may share a process)."""

    def __init__(self, queue_length, outbox_pending):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.instances = Counter("ctedge_instances_received", "DICOM instances received (stored, "
                                 "duplicate or refused)", registry=self.registry)
        self.answered = Counter("ctedge_studies_answered", "Studies answered", registry=self.registry)
        self.failed = Counter("ctedge_studies_failed", "Studies without an answer (error)", registry=self.registry)
        self.latency = Histogram("ctedge_answer_latency_seconds", "Last instance received -> SR in the outbox "
                                 "(includes the quiet period)", registry=self.registry,
                                 buckets=(0.5, 1, 2, 5, 7.5, 10, 15, 30, 60, 120))
        self.http_requests = Counter("ctedge_http_classifications", "HTTP classification requests answered",
                                     ["endpoint"], registry=self.registry)
        Gauge("ctedge_queue_length", "Jobs waiting for or on the worker", registry=self.registry
              ).set_function(queue_length)
        Gauge("ctedge_outbox_pending", "Results not yet sent to every destination", registry=self.registry
              ).set_function(outbox_pending)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """Everything one `ctedge serve` runs, started and stopped together."""

    def __init__(self, config: ServeConfig):
        from ctedge.edge.runtime import Classifier

        self.config = config
        self.clf = Classifier(config.model, config.provider, config.threads, runtime=config.runtime,
                                     precision=config.precision)
        self.options = StudyOptions(max_slices=config.max_slices)
        self.algorithm = Algorithm("ctedge " + config.model.stem, __version__, file_digest(config.model),
                                   self.clf.threshold)
        self.records: dict[str, StudyRecord] = {}
        self.recent: deque[StudyRecord] = deque(maxlen=RECENT)
        self.errors: deque[str] = deque(maxlen=20)
        self.lock = threading.Lock()
        self.spool = Spool(config.spool, config.max_study_instances, config.min_free_disk)
        self.worker = Worker(config.queue_size)
        self.outbox = Outbox(config.spool / "outbox", config.destination, config.ae_title, config.retries,
                             config.retry_seconds, on_sent=self._sent)
        self.metrics = Metrics(self.worker.length, self.outbox.pending)
        self.node = Node(config, self.spool, on_received=self.metrics.instances.inc)
        self.assembler = Assembler(self.spool, self.worker, self.outbox, self.clf, self.options, self.algorithm,
                                   config.quiet_seconds, self._answered, config.log_phi, config.secondary_capture)
        self._load_answers()
        self.started = False

    def _load_answers(self) -> None:
        """Answers given before a restart, for /v1/studies/{uid}."""
        for study in self.spool.studies.values():
            summary = self.spool.saved_summary(study)
            if summary is not None:
                unsent = (self.outbox.folder / f"{study.key}-v{study.version}.json").exists()
                self.records[study.study_uid] = StudyRecord(study.study_uid, 0.0, study.version,
                                                            study.answered_instances, summary, 0.0,
                                                            sent=not unsent and not summary.get("error"))

    def _answered(self, record: StudyRecord) -> None:
        with self.lock:
            self.records[record.study_uid] = record
            self.recent.appendleft(record)
        if record.summary.get("error"):
            self.metrics.failed.inc()
            self.errors.appendleft(f"{time.strftime('%H:%M:%S')} study {uid_hash(record.study_uid)}: "
                                   f"{hash_uids(record.summary['error'])}")
        else:
            self.metrics.answered.inc()
            self.metrics.latency.observe(record.latency_s)

    def _sent(self, name: str) -> None:
        key, _, version = name.rpartition("-v")
        with self.lock:
            for record in self.records.values():
                study = self.spool.studies.get(record.study_uid)
                if study is not None and study.key == key and str(record.version) == version:
                    record.sent = True

    def start(self) -> None:
        self.worker.start()
        self.outbox.start()
        self.assembler.start()
        self.node.start()
        self.started = True

    def stop(self) -> None:
        self.started = False
        self.node.stop()
        self.assembler.stop()
        self.worker.stop()
        self.outbox.stop()
