"""Completeness: a study that may be incomplete (aborted association, instances refused, a
gap, fewer instances than ImagesInAcquisition) is not answered at its quiet period; it waits, then is answered
PARTIAL (or not at all with no_partial); a sender that retries and releases normally
makes it complete again."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
from pynetdicom import AE

from ctedge.core.phantom_studies import write_study
from ctedge.edge.serve.sr import read_sr
from serve_fixtures import LOOPBACK, Collector, running_service, send_files, serve_model, study_files, wait_for

__all__ = ["serve_model"]


def _send_and_abort(files, port: int) -> int:
    """C-STORE ``files`` in one association, then abort it (a sender killed mid-study)."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(str(datasets[0].SOPClassUID), str(datasets[0].file_meta.TransferSyntaxUID))
    assoc = ae.associate(LOOPBACK, port, ae_title="CTEDGE")
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.abort()
    return statuses.count(0)


def _answer(service, study_uid: str, version: int = 1) -> dict:
    return wait_for(lambda: (view := service.study_view(study_uid)[1]).get("version") == version
                    and view.get("delivery") in ("sent", "none") and view, what=f"answer v{version}")


def test_an_aborted_transfer_waits_and_a_normal_retry_completes_it(tmp_path, serve_model):
    """Aborted after 6 of 10: past its quiet period it is still 202, flagged as maybe incomplete;
    the sender sends the whole study again and releases: one COMPLETE answer of all 10."""
    study_uid = write_study(tmp_path / "s", np.random.default_rng(50), True, slices=10, scout=False)
    files = study_files(tmp_path / "s")
    collector = Collector().start()
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination], quiet_seconds=0.1,
                             incomplete_seconds=60) as service:
            assert _send_and_abort(files[:6], service.node.port) == 6
            wait_for(lambda: service.study_view(study_uid)[1]["may_be_incomplete"], what="the wait")
            status, view = service.study_view(study_uid)
            assert (status, view["association"]) == (202, "aborted")
            assert view["may_be_incomplete"] == "the sender's association was aborted"
            assert send_files(files, service.node.port) == [0] * 10
            answer = _answer(service, study_uid)
    finally:
        collector.stop()
    assert (answer["instances"], answer["completion"], answer["completion_reason"]) == (10, "COMPLETE", None)
    assert [read_sr(ds)["completion"] for ds in collector.received] == ["COMPLETE"]


def test_still_incomplete_after_the_wait_is_answered_partial_then_superseded(tmp_path, serve_model, caplog):
    """Nothing more within incomplete_seconds: answered PARTIAL, said in the SR (CompletionFlag,
    CompletionFlagDescription), the JSON and the log. The sender then re-sends the study (nothing
    new) and releases: a COMPLETE v2 supersedes the PARTIAL v1."""
    caplog.set_level(logging.INFO, logger="ctedge.edge.serve")
    study_uid = write_study(tmp_path / "s", np.random.default_rng(51), True, slices=10, scout=False)
    files = study_files(tmp_path / "s")
    collector = Collector().start()
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination], quiet_seconds=0.1,
                             incomplete_seconds=0.5) as service:
            assert _send_and_abort(files, service.node.port) == 10  # every instance, but the end was an abort
            partial = _answer(service, study_uid)
            assert send_files(files, service.node.port) == [0] * 10  # duplicates only, released normally
            complete = _answer(service, study_uid, version=2)
    finally:
        collector.stop()
    reason = "the sender's association was aborted"
    assert (partial["completion"], partial["completion_reason"]) == ("PARTIAL", reason)
    assert f"incomplete study: {reason}" in partial["result"]["warnings"]
    first, second = (read_sr(ds) for ds in collector.received)
    assert (first["completion"], first["completion_reason"]) == ("PARTIAL", f"incomplete study: {reason}")
    assert (second["completion"], complete["completion"]) == ("COMPLETE", "COMPLETE")
    assert (collector.received[1].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID == first["sop_instance_uid"])
    assert f"PARTIAL: {reason}" in caplog.text


def _with_gap(folder) -> list:
    """The study's files less the one in the middle of the scan (a gap in the positions)."""
    files = study_files(folder)
    by_z = sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    return [f for f in files if f != by_z[len(by_z) // 2]]


def _announcing(folder, count: int) -> list:
    """The study's files, each saying the acquisition has ``count`` images."""
    files = study_files(folder)
    for file in files:
        ds = pydicom.dcmread(file)
        ds.ImagesInAcquisition = count
        ds.save_as(file)
    return files


def test_geometry_or_refusals_say_incomplete_and_no_partial_gives_no_answer(tmp_path, serve_model):
    """Released normally, but a gap in the slice positions, fewer instances than
    ImagesInAcquisition, or an instance refused (0xA700: over --max-study-instances): the same
    wait; with no_partial, no SR at all and the reason given."""
    gap_uid = write_study(tmp_path / "gap", np.random.default_rng(52), True, slices=10, scout=False)
    short_uid = write_study(tmp_path / "short", np.random.default_rng(53), True, slices=10, scout=False)
    full_uid = write_study(tmp_path / "full", np.random.default_rng(54), True, slices=11, scout=False)
    collector = Collector().start()
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination], quiet_seconds=0.1,
                             incomplete_seconds=0.5, no_partial=True, max_study_instances=10) as service:
            assert send_files(_with_gap(tmp_path / "gap"), service.node.port) == [0] * 9
            assert send_files(_announcing(tmp_path / "short", 12), service.node.port) == [0] * 10
            assert send_files(study_files(tmp_path / "full"), service.node.port) == [0] * 10 + [0xA700]
            gap, short, full = (_answer(service, uid) for uid in (gap_uid, short_uid, full_uid))
    finally:
        collector.stop()
    assert gap["completion_reason"].startswith("gap of ")
    assert short["completion_reason"] == "10 of 12 instances (ImagesInAcquisition) received"
    assert full["completion_reason"] == "instances were refused (out of resources) and may come again"
    for answer in (gap, short, full):
        assert answer["status"] == "no answer" and answer["completion"] == "PARTIAL"
        assert answer["result"]["error"].endswith("not answered (--no-partial)") and answer["delivery"] == "none"
    assert collector.received == []
