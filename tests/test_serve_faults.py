"""The node under faults, in-process: a crash at every journal transition (the crash-point
matrix), a full disk at any write, a classification that raises, a loop that dies."""

from __future__ import annotations

import errno
import sqlite3
import threading

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE

from ctedge.core.phantom_studies import write_study
from ctedge.edge.serve import assembler as assembler_module
from ctedge.edge.serve.faults import POINTS, Crashed, Faults
from ctedge.edge.serve.http import create_app
from serve_fixtures import LOOPBACK, Collector, running_service, send_files, serve_model, study_files, wait_for

__all__ = ["serve_model"]
FAST = dict(quiet_seconds=0.1, retry_seconds=0.05)


def _send(files, port: int) -> int:
    """One association, stopping at the first C-STORE not acknowledged; the count acknowledged."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(str(datasets[0].SOPClassUID), str(datasets[0].file_meta.TransferSyntaxUID))
    assoc = ae.associate(LOOPBACK, port, ae_title="CTEDGE")
    acknowledged = 0
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if not status or status.Status != 0:
            break
        acknowledged += 1
    assoc.release()
    return acknowledged


class CrashAt:
    """A hook that crashes the node the first time it reaches ``point``."""

    def __init__(self, point: str):
        self.point, self.crashed = point, threading.Event()

    def __call__(self, point: str) -> None:
        if point == self.point and not self.crashed.is_set():
            self.crashed.set()
            raise Crashed(f"injected at {point}")


def _first_run(tmp_path, model, files, collector, point, monkeypatch) -> int:
    """The node crashes at ``point`` while it receives, answers and sends one study (sent again
    once answered, for the redelivery point); the count of instances it acknowledged."""
    hook = CrashAt(point)
    options = dict(FAST, destination=[collector.destination])
    if point == "retention.deleted":
        options["keep_days"] = 1e-9
    if point == "classify.failed":
        real, calls = assembler_module.classify_spooled, []

        def fails_once(*args):
            calls.append(1)
            if len(calls) == 1:
                raise MemoryError("transient")
            return real(*args)

        monkeypatch.setattr(assembler_module, "classify_spooled", fails_once)
    with running_service(tmp_path, model, faults=Faults(hook=hook), **options) as service:
        acknowledged = _send(files, service.node.port)
        if point == "redelivery.queued":
            wait_for(lambda: collector.received or hook.crashed.is_set(), what="the SR")
            _send(files, service.node.port)
        wait_for(hook.crashed.is_set, what=f"the crash at {point}")
    monkeypatch.undo()
    return acknowledged


@pytest.mark.parametrize("point", [p for p in POINTS if p != "journal.write"])
def test_a_crash_at_any_transition_gives_one_answer_delivered_at_least_once(tmp_path, serve_model, point,
                                                                           monkeypatch):
    """Crash at ``point``, restart on the same spool (the sender sends the study again when it
    had not got every acknowledgement): one answer, COMPLETE, its SR at the destination at
    least once, every copy the same SOPInstanceUID and the same bytes."""
    study_uid = write_study(tmp_path / "s", np.random.default_rng(40), True, slices=8, scout=False)
    files = study_files(tmp_path / "s")
    collector = Collector().start()
    try:
        acknowledged = _first_run(tmp_path, serve_model, files, collector, point, monkeypatch)
        with running_service(tmp_path, serve_model, destination=[collector.destination], **FAST) as service:
            if acknowledged < len(files):
                assert _send(files, service.node.port) == len(files)
            if point != "retention.deleted":
                answer = wait_for(lambda: (view := service.study_view(study_uid)[1]) and view.get("sent") and view,
                                  what="the answer sent")
                assert (answer["version"], answer["completion"], answer["instances"]) == (1, "COMPLETE", len(files))
                assert service.journal.value("SELECT COUNT(*) FROM answers") == 1
            files_kept = sorted(p.name for p in (tmp_path / "spool" / "studies").rglob("*") if p.is_file())
            listed = sorted(name for names in service.journal.instance_files().values() for name in names)
    finally:
        collector.stop()
    assert files_kept == listed  # no orphan survives a restart
    assert {str(ds.StudyInstanceUID) for ds in collector.received} == {study_uid}
    assert len({str(ds.SOPInstanceUID) for ds in collector.received}) == 1
    assert len(set(collector.encoded)) == 1  # the same content each time it went out
    if point == "delivery.sent":
        assert len(collector.received) == 2  # acknowledged by the PACS, not recorded: sent again


def test_a_full_disk_pauses_the_node_and_it_resumes_by_itself(tmp_path, serve_model):
    """ENOSPC on an instance file, then "database or disk is full" on the answer's commit: the
    node pauses (0xA700, /readyz 503 naming the reason, ctedge_paused 1), nothing acknowledged
    is lost, and it resumes when writes succeed again; the study is answered once."""
    study_uid = write_study(tmp_path / "s", np.random.default_rng(41), False, slices=8, scout=False)
    files = study_files(tmp_path / "s")
    full = threading.Event()

    def disk(point: str) -> None:
        if full.is_set() and point == "instance.written":
            raise OSError(errno.ENOSPC, "No space left on device")
        if full.is_set() and point == "journal.write":
            raise sqlite3.OperationalError("database or disk is full")

    collector = Collector().start()
    try:
        with running_service(tmp_path, serve_model, faults=Faults(hook=disk), destination=[collector.destination],
                             quiet_seconds=3.0) as service, TestClient(create_app(service)) as client:
            # (3 s quiet: the disk must be full again before it ends, on a loaded machine too)
            assert send_files(files[:2], service.node.port) == [0, 0]
            wait_for(lambda: service.study_view(study_uid)[1]["association"] == "released", what="the release")
            full.set()
            assert send_files(files[2:4], service.node.port) == [0xA700, 0xA700]  # the second: paused already
            readiness = client.get("/readyz")
            assert readiness.status_code == 503 and "No space left" in readiness.json()["pause"]["reason"]
            assert "ctedge_paused 1.0" in client.get("/metrics").text
            full.clear()
            wait_for(lambda: client.get("/readyz").status_code == 200, what="the node to resume")
            assert send_files(files[2:], service.node.port) == [0] * 6
            wait_for(lambda: service.study_view(study_uid)[1]["association"] == "released", what="the release")
            full.set()  # full again during the quiet period: the answer can't be committed
            wait_for(lambda: service.pause.paused, what="the pause")
            assert service.study_view(study_uid)[0] == 202
            full.clear()
            answer = wait_for(lambda: (view := service.study_view(study_uid)[1]).get("sent") and view, what="sent")
    finally:
        collector.stop()
    assert answer["instances"] == 8 and answer["version"] == 1 and len(collector.received) == 1


def test_a_transient_classification_error_is_retried_a_data_error_is_final(tmp_path, serve_model, monkeypatch):
    """A classification that raises is tried again with backoff, up to ``classify_retries``; then
    the error is the answer. A study with no series the rules accept is answered at once: not
    eligible, not an error, no SR."""
    from ctedge.core.phantom_studies import write_scout

    study_uid = write_study(tmp_path / "s", np.random.default_rng(42), True, slices=8, scout=False)
    scout_uid = "1.2.826.0.1.3680043.10.1.78"
    write_scout(tmp_path / "scout", np.random.default_rng(43), scout_uid, "P-43")
    real, calls = assembler_module.classify_spooled, []

    def fails_for_the_ct(clf, folder, uid, options):
        calls.append(uid)
        if uid == study_uid:
            raise MemoryError("out of memory, for now")
        return real(clf, folder, uid, options)

    monkeypatch.setattr(assembler_module, "classify_spooled", fails_for_the_ct)
    with running_service(tmp_path, serve_model, classify_retries=3, **FAST) as service:
        assert send_files(study_files(tmp_path / "s"), service.node.port) == [0] * 8
        assert send_files(study_files(tmp_path / "scout"), service.node.port) == [0, 0]
        answer = wait_for(lambda: service.study_view(study_uid)[1].get("result"), what="the final answer")
        scout = wait_for(lambda: (view := service.study_view(scout_uid)[1]).get("result") and view,
                         what="the scout's answer")
    assert calls.count(study_uid) == 3 and answer["error"].startswith("internal error (MemoryError")
    assert calls.count(scout_uid) == 1 and scout["status"] == "not eligible" and scout["delivery"] == "none"
    assert scout["result"]["error"] is None and scout["result"]["not_eligible"].startswith("no series meets the rules")


def test_a_loop_that_dies_is_restarted_and_readyz_says_so_meanwhile(tmp_path, serve_model, monkeypatch):
    """An error out of a loop's step ends its thread: /readyz is 503 naming the loop, the
    supervisor restarts it after its backoff and counts the restart."""
    with running_service(tmp_path, serve_model, loop_restart_seconds=0.3) as service, \
            TestClient(create_app(service)) as client:
        real, broken = service.retention.step, threading.Event()

        def step():
            if not broken.is_set():
                broken.set()
                raise RuntimeError("a bug")
            return real()

        service.loops["retention"].step = step
        wait_for(lambda: client.get("/readyz").status_code == 503, what="the dead loop in /readyz")
        readiness = client.get("/readyz").json()
        assert "the retention loop is not running" in readiness["reasons"]
        assert readiness["loops"]["retention"]["last_error"] == "RuntimeError: a bug"
        wait_for(lambda: client.get("/readyz").status_code == 200, what="the restart")
        assert client.get("/readyz").json()["loops"]["retention"]["restarts"] == 1
