"""`ctedge serve`'s DICOM side in-process: receive, complete, classify, SR back, refusals."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import ssl
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from ctedge.core.phantom_studies import write_study
from ctedge.edge.runtime import Classifier
from ctedge.edge.serve.config import Peer
from ctedge.edge.serve.sr import read_sr
from ctedge.edge.study import StudyOptions, classify_study, find_studies
from serve_fixtures import Collector, running_service, send_files, serve_model, study_files, wait_for

__all__ = ["serve_model"]  # the fixture, imported for pytest


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["uncompressed", "rle"])
def test_study_round_trip_sr_matches_classify_study(tmp_path, serve_model, syntax):
    """A shuffled 12-slice study with a scout, sent by a pynetdicom SCU, comes back as one
    SR whose probability is classify_study's on the same files and whose UIDs are the study's."""
    study_uid = write_study(tmp_path / "study", np.random.default_rng(3), True, slices=12, patient_id="P-7")
    files = study_files(tmp_path / "study")
    np.random.default_rng(0).shuffle(files)
    expected = classify_study(Classifier(serve_model, runtime="onnxruntime"), find_studies(tmp_path / "study")[0],
                              StudyOptions())
    collector = Collector().start()
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination]) as service:
            assert send_files(files, service.node.port, syntax=syntax) == [0] * len(files)
            answer = wait_for(lambda: (view := service.study_view(study_uid)[1]).get("sent") and view, what="the SR")
    finally:
        collector.stop()
    assert len(collector.received) == 1
    sr = read_sr(collector.received[0])
    assert sr["study_uid"] == study_uid and sr["patient_id"] == "P-7"
    assert abs(sr["measurements"]["Probability"] - expected.probability) <= 1e-6
    assert sr["measurements"]["Slices used"] == expected.slices_used
    assert sr["finding"] == ("Present" if expected.label == "CT_COVID" else "Absent")
    assert sr["references"] == [top["sop_instance_uid"] for top in answer["result"]["top_slices"]]
    assert sr["completion"] == answer["completion"] == "COMPLETE" and answer["sent"] and answer["version"] == 1
    assert collector.received[0].PatientName == ""  # absent in the input: left empty, not invented


def test_allow_list_rejects_unknown_callers(tmp_path, serve_model, caplog):
    """Only allowed AE titles (and hosts, when given) may associate, and only calling this node's
    AE title; the log says why not."""
    files = study_files(tmp_path / "s") if write_study(tmp_path / "s", np.random.default_rng(4), False, slices=4,
                                                       scout=False) else []
    allow = [Peer.parse("PACS"), Peer.parse("REMOTE@10.9.9.9")]
    with running_service(tmp_path, serve_model, allow=allow) as service:
        assert send_files(files[:1], service.node.port, ae_title="SCANNER") is None
        assert send_files(files[:1], service.node.port, ae_title="REMOTE") is None  # right AE, wrong host
        assert send_files(files[:1], service.node.port, ae_title="PACS") == [0]
        assert send_files(files[:1], service.node.port, ae_title="PACS", called="NOT-CTEDGE") is None
    assert "association from SCANNER@127.0.0.1 rejected: not in --allow" in caplog.text
    assert "association from PACS@127.0.0.1 rejected: it called AE title NOT-CTEDGE, this node is CTEDGE" \
        in caplog.text


def test_limits_answer_out_of_resources_and_keep_what_was_received(tmp_path, serve_model, monkeypatch):
    files = study_files(tmp_path / "s") if write_study(tmp_path / "s", np.random.default_rng(5), False, slices=8,
                                                       scout=False) else []
    with running_service(tmp_path / "full", serve_model, max_study_instances=5, quiet_seconds=60) as service:
        assert send_files(files, service.node.port) == [0] * 5 + [0xA700] * 3
        assert send_files(files[:2], service.node.port) == [0, 0]  # duplicates: counted once, acknowledged
        [(instances, key)] = service.journal.rows("SELECT instances, key FROM studies")
        assert instances == 5 and len(list(service.spool.folder(key).glob("*.dcm"))) == 5
    with running_service(tmp_path / "unwritable", serve_model) as service:
        def disk_full(*args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(service.spool, "store", disk_full)
        assert send_files(files[:1], service.node.port) == [0xA700]  # refused, never a false success
    with running_service(tmp_path / "disk", serve_model, min_free_disk=1 << 60) as service:
        assert send_files(files[:2], service.node.port) == [0xA700] * 2
        enhanced = pydicom.dcmread(files[0])
        enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
        enhanced.save_as(tmp_path / "enhanced.dcm")
        assert send_files([tmp_path / "enhanced.dcm"], service.node.port) == [0x0122]  # not supported yet


def test_invalid_uids_are_refused_and_never_reach_the_spool(tmp_path, serve_model):
    """UIDs that break the UI rules (a path, 100k characters, empty, a leading zero, an empty
    component) get a failure status; nothing of them is spooled; a valid instance still is, under
    a generated name inside the spool."""
    from pydicom.uid import ImplicitVRLittleEndian

    path = study_files(tmp_path / "s")[0] if write_study(tmp_path / "s", np.random.default_rng(6), False, slices=4,
                                                         scout=False) else None
    bad = {"path": ("StudyInstanceUID", "../../escaped"), "long": ("StudyInstanceUID", "1.2" + ".3" * 50_000),
           "empty": ("StudyInstanceUID", ""), "zero": ("SeriesInstanceUID", "1.2.03.4"),
           "gap": ("SOPInstanceUID", "1.2..4")}
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs, as it should
        for name, (keyword, value) in bad.items():
            ds = pydicom.dcmread(path)
            setattr(ds, keyword, value)
            if name == "long":  # over explicit VR's 64 KiB value length: sent as implicit VR
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.save_as(tmp_path / f"{name}.dcm", implicit_vr=name == "long", little_endian=True)
            files.append(tmp_path / f"{name}.dcm")
        with running_service(tmp_path, serve_model, quiet_seconds=60) as service:
            assert [send_files([file], service.node.port) for file in files] == [[0xC000]] * len(files)
            assert service.journal.value("SELECT COUNT(*) FROM studies") == 0
            assert send_files([path], service.node.port) == [0]
            key = service.journal.study(str(pydicom.dcmread(path).StudyInstanceUID)).key
            folder = service.spool.folder(key)
    stored = [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to((tmp_path / "spool").resolve()) for p in stored)
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.parent.glob("escaped*"))
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert [p.stem for p in folder.iterdir()] and all(re.fullmatch(r"[0-9a-f]{32}", p.stem) for p in folder.iterdir())


def test_late_instances_supersede_the_answer(tmp_path, serve_model, caplog):
    """An instance arriving after the answer starts answer v2: a new SR naming v1 as its predecessor."""
    caplog.set_level(logging.INFO, logger="ctedge.edge.serve")
    write_study(tmp_path / "s", np.random.default_rng(7), True, slices=10, scout=False)
    files = study_files(tmp_path / "s")
    collector = Collector().start()
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination]) as service:
            assert send_files(files[:-1], service.node.port) == [0] * 9
            wait_for(lambda: len(collector.received) == 1, what="SR v1")
            assert send_files(files[-1:], service.node.port) == [0]
            wait_for(lambda: len(collector.received) == 2, what="SR v2")
    finally:
        collector.stop()
    first, second = collector.received
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert (second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID == first.SOPInstanceUID)
    assert "answer v2 supersedes v1" in caplog.text


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(folder: Path) -> None:
    """A test CA, and a certificate it signed for the node and for a client."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca",
             cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("node", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=localhost", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=folder)


def test_tls_needs_the_right_ca(tmp_path, serve_model):
    """DICOM TLS: a client with a certificate from --tls-ca is accepted (beside a connection that
    never starts its handshake); one without is refused, and a client that does not trust the
    node's CA gets no association either."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not found")
    _certificates(tmp_path)
    files = study_files(tmp_path / "s") if write_study(tmp_path / "s", np.random.default_rng(8), False, slices=4,
                                                       scout=False) else []

    def client(ca: bool, cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "ca.pem") if ca else None)
        if cert:
            context.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
        return context

    with running_service(tmp_path, serve_model, tls_cert=tmp_path / "node.pem", tls_key=tmp_path / "node.key",
                         tls_ca=tmp_path / "ca.pem", quiet_seconds=60) as service:
        port = service.node.port
        silent = socket.create_connection(("127.0.0.1", port))  # the handshake waits in its own thread
        assert send_files(files[:1], port, ssl_context=client(ca=True, cert=True)) == [0]
        silent.close()
        assert send_files(files[:1], port, ssl_context=client(ca=True, cert=False)) is None
        assert send_files(files[:1], port, ssl_context=client(ca=False, cert=True)) is None
        assert send_files(files[:1], port) is None  # plain DICOM to a TLS port


def test_a_study_no_rule_accepts_is_not_eligible_with_why(tmp_path, serve_model, caplog):
    """The node applies its rules: a scout-only study (the defaults) and an 8-slice axial one
    (``min-slices`` 10 from the configuration) get no SR; /v1/studies/{uid}, the status page,
    the metrics and the log say "not eligible" and why, and it is no error."""
    from fastapi.testclient import TestClient

    from ctedge.core.phantom_studies import write_scout
    from ctedge.edge.serve.http import create_app
    from ctedge.edge.study.rules import SeriesRules

    scout_uid = "1.2.826.0.1.3680043.10.1.77"
    write_scout(tmp_path / "scout", np.random.default_rng(9), scout_uid, "P-9")
    short_uid = write_study(tmp_path / "short", np.random.default_rng(10), True, slices=8, scout=False)
    collector = Collector().start()
    try:
        with caplog.at_level(logging.INFO, logger="ctedge"), \
                running_service(tmp_path, serve_model, destination=[collector.destination],
                                rules=SeriesRules(min_slices=10)) as service, \
                TestClient(create_app(service)) as client:
            assert send_files(study_files(tmp_path / "scout"), service.node.port) == [0, 0]
            assert send_files(study_files(tmp_path / "short"), service.node.port) == [0] * 8
            views = [wait_for(lambda uid=uid: (view := client.get(f"/v1/studies/{uid}").json()).get("result") and view,
                              what="the answer") for uid in (scout_uid, short_uid)]
            metrics, page = client.get("/metrics").text, client.get("/").text
    finally:
        collector.stop()
    scout, short = (view["result"] for view in views)
    assert [view["status"] for view in views] == ["not eligible"] * 2 and {v["delivery"] for v in views} == {"none"}
    assert scout["error"] is None and scout["probability"] is None and "LOCALIZER" in scout["not_eligible"]
    assert "8 slice(s), fewer than min-slices 10" in short["not_eligible"]
    assert "ctedge_studies_not_eligible_total 2.0" in metrics and "ctedge_studies_failed_total 0.0" in metrics
    assert page.count("not eligible: no series meets the rules") == 2
    assert caplog.text.count("not eligible: no series meets the rules") == 2 and "min-slices 10" in caplog.text
    assert collector.received == []


def test_secondary_capture_goes_with_the_sr(tmp_path, serve_model):
    """--secondary-capture: the answer also as an image in the patient's study, with the
    patient's attributes copied (absent ones empty), its plot drawn, its own UID."""
    study_uid = write_study(tmp_path / "s", np.random.default_rng(8), True, slices=10, scout=False, patient_id="P-9")
    collector = Collector().start()
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination],
                             secondary_capture=True) as service:
            assert send_files(study_files(tmp_path / "s"), service.node.port) == [0] * 10
            wait_for(lambda: len(collector.received) == 2, what="the SR and the Secondary Capture")
    finally:
        collector.stop()
    by_class = {str(ds.SOPClassUID): ds for ds in collector.received}
    sc = by_class[SecondaryCaptureImageStorage]
    sr = read_sr(by_class[Comprehensive3DSRStorage])
    assert sc.StudyInstanceUID == study_uid == sr["study_uid"] and sc.PatientID == "P-9"
    assert sc.PatientName == "" and sc.SOPInstanceUID != sr["sop_instance_uid"]
    pixels = sc.pixel_array
    assert pixels.shape == (360, 640) and pixels.min() == 0 and pixels.max() == 255  # a plot, not a blank
