"""kill -9 of `ctedge serve` (a subprocess, killed by itself at a named crash point through
CTEDGE_CRASH_AT): in the middle of a C-STORE inside an association, and right after the
PACS acknowledged a result. Nothing acknowledged is lost, the study cut off mid-transfer
is not answered as if it were whole, each study gets one SR (the same bytes when sent again)."""

from __future__ import annotations

import numpy as np
import pydicom
from pynetdicom import AE

from ctedge.core.phantom_studies import write_study
from ctedge.edge.serve.sr import read_sr
from serve_fixtures import LOOPBACK, Collector, NodeProcess, send_files, serve_model, study_files, wait_for

__all__ = ["serve_model"]


def _send_until_cut(files, port: int) -> int:
    """One association for all ``files``; the count acknowledged before the node went away."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="SCANNER")
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, str(datasets[0].file_meta.TransferSyntaxUID))
    assoc = ae.associate(LOOPBACK, port, ae_title="CTEDGE")
    acknowledged = 0
    for ds in datasets:
        status = assoc.send_c_store(ds) if assoc.is_established else None
        if not status or status.Status != 0:
            break
        acknowledged += 1
    if assoc.is_established:
        assoc.release()
    return acknowledged


def test_kill_9_mid_c_store_and_after_the_pacs_acknowledged(tmp_path, serve_model):
    rng = np.random.default_rng(21)
    answered_uid = write_study(tmp_path / "a", rng, True, slices=10, patient_id="SECRET-PID-A")
    arriving_uid = write_study(tmp_path / "b", rng, False, slices=10, patient_id="SECRET-PID-B")
    a_files, b_files = study_files(tmp_path / "a"), study_files(tmp_path / "b")
    collector = Collector()  # the PACS is down at first
    spool = tmp_path / "spool"
    (tmp_path / "serve.toml").write_text("retry-seconds = 0.2\n")  # the quick retries, quicker
    args = ("--config", str(tmp_path / "serve.toml"), "--quiet-seconds", "0.5", "--destination",
            f"{collector.ae_title}@127.0.0.1:{collector.port}")
    crash = {"CTEDGE_CRASH_AT": f"instance.written:{len(a_files) + 6}"}  # B's 6th C-STORE: on disk, not acknowledged
    first = NodeProcess(serve_model, spool, *args, env=crash).start()
    try:
        assert send_files(a_files, first.dicom_port) == [0] * len(a_files)
        wait_for(lambda: first.get(f"/v1/studies/{answered_uid}")[1].get("status") == "answered", what="answer A")
        assert first.get(f"/v1/studies/{answered_uid}")[1]["delivery"] == "pending"  # the PACS is down
        assert _send_until_cut(b_files, first.dicom_port) == 5  # kill -9 inside the association
        wait_for(first.died, what="the node to kill itself")
    finally:
        first.stop()
    second = NodeProcess(serve_model, spool, *args, dicom_port=first.dicom_port,
                         env={"CTEDGE_CRASH_AT": "delivery.sent"}).start()
    try:
        status, body = second.get(f"/v1/studies/{arriving_uid}")
        assert (status, body["instances"], body["association"]) == (202, 5, "recovered")  # kept, maybe incomplete
        [b_folder] = [p for p in (spool / "studies").iterdir() if len(list(p.iterdir())) != len(a_files)]
        assert len(list(b_folder.iterdir())) == 5  # the unacknowledged 6th file: an orphan, removed
        collector.start()
        wait_for(second.died, what="the node to kill itself once the PACS acknowledged A's SR")
    finally:
        second.stop()
    assert [read_sr(ds)["study_uid"] for ds in collector.received] == [answered_uid]
    third = NodeProcess(serve_model, spool, *args, dicom_port=first.dicom_port).start()
    try:
        assert send_files(b_files, third.dicom_port) == [0] * len(b_files)  # the sender retries the study
        wait_for(lambda: third.get(f"/v1/studies/{arriving_uid}")[1].get("sent"), timeout=30, what="B sent")
        wait_for(lambda: third.get(f"/v1/studies/{answered_uid}")[1].get("sent"), what="A recorded as sent")
        b_answer = third.get(f"/v1/studies/{arriving_uid}")[1]
    finally:
        third.stop()
        collector.stop()
    by_study: dict[str, list[bytes]] = {}
    for ds, encoded in zip(collector.received, collector.encoded):
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(encoded)
    assert {uid: len(copies) for uid, copies in by_study.items()} == {answered_uid: 2, arriving_uid: 1}
    assert by_study[answered_uid][0] == by_study[answered_uid][1]  # at least once: the same SR, byte for byte
    assert (b_answer["version"], b_answer["instances"], b_answer["completion"]) == (1, len(b_files), "COMPLETE")
    for node in (first, second, third):  # no patient data in the logs, UIDs hashed
        log = node.log.read_text()
        assert "SECRET-PID" not in log and answered_uid not in log and arriving_uid not in log
    assert "instance(s)" in first.log.read_text()  # ... though the study lines are there
