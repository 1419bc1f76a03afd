"""kill -9 of `ctedge serve` (a subprocess): nothing acknowledged is lost, each study gets
exactly one SR at the destination after the restart."""

from __future__ import annotations

import time

import numpy as np

from ctedge.core.phantom_studies import write_study
from ctedge.edge.serve.sr import read_sr
from serve_fixtures import Collector, NodeProcess, send_files, serve_model, study_files, wait_for

__all__ = ["serve_model"]


def _send_one_by_one(files, port: int, stop_after: int, node: NodeProcess) -> int:
    """Send ``files``, kill -9 the node after ``stop_after`` acknowledgements; the count acknowledged."""
    acknowledged = 0
    for index, file in enumerate(files):
        if index == stop_after:
            node.kill()
        statuses = send_files([file], port)
        if statuses != [0]:
            break
        acknowledged += 1
    return acknowledged


def test_kill_9_while_receiving_and_before_sending(tmp_path, serve_model):
    rng = np.random.default_rng(21)
    answered_uid = write_study(tmp_path / "a", rng, True, slices=10, patient_id="SECRET-PID-A")
    arriving_uid = write_study(tmp_path / "b", rng, False, slices=10, patient_id="SECRET-PID-B")
    collector = Collector()  # the PACS is down during the first run
    spool = tmp_path / "spool"
    args = ("--quiet-seconds", "2", "--destination", f"{collector.ae_title}@127.0.0.1:{collector.port}")
    first = NodeProcess(serve_model, spool, *args).start()
    try:
        assert send_files(study_files(tmp_path / "a"), first.dicom_port) == [0] * 12
        wait_for(lambda: first.get(f"/v1/studies/{answered_uid}")[1].get("status") == "answered", what="answer A")
        assert first.get(f"/v1/studies/{answered_uid}")[1]["sent"] is False  # answered, SR in the outbox only
        b_files = study_files(tmp_path / "b")
        acknowledged = _send_one_by_one(b_files, first.dicom_port, 5, first)  # kill -9 mid-study
        assert acknowledged == 5
    finally:
        first.stop()
    collector.start()
    second = NodeProcess(serve_model, spool, *args, dicom_port=first.dicom_port).start()
    try:
        status, body = second.get(f"/v1/studies/{arriving_uid}")
        assert (status, body["instances"]) == (202, 5)  # every acknowledged instance survived
        assert send_files(b_files, second.dicom_port) == [0] * len(b_files)  # the sender retries the study
        wait_for(lambda: {read_sr(ds)["study_uid"] for ds in collector.received} >= {answered_uid, arriving_uid},
                 timeout=30, what="both SRs")
        time.sleep(1.0)  # room for a duplicate to show up
        assert second.get(f"/v1/studies/{arriving_uid}")[1]["instances"] == len(b_files)
    finally:
        second.stop()
        collector.stop()
    by_study: dict[str, set] = {}
    for ds in collector.received:
        by_study.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    assert {uid: len(sops) for uid, sops in by_study.items()} == {answered_uid: 1, arriving_uid: 1}
    for node in (first, second):  # no patient data in the logs, UIDs hashed
        log = node.log.read_text()
        assert "SECRET-PID" not in log and answered_uid not in log and arriving_uid not in log
        assert "instance(s)" in log  # ... though the study lines are there
