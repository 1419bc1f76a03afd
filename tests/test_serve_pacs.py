"""`ctedge serve` with programs nobody here wrote: a real PACS (Orthanc) and dcmtk's
storescu/echoscu (``orthanc_fixture``: missing binaries skip these tests, unless
CTEDGE_REQUIRE_PACS=1, as in .ci/run, where they fail)."""

from __future__ import annotations

import subprocess
import time

import numpy as np

from ctedge.core.phantom_studies import write_study
from ctedge.edge.serve.config import Destination
from ctedge.edge.serve.sr import read_sr
from orthanc_fixture import ECHOSCU, ORTHANC, STORESCU, Orthanc, require
from serve_fixtures import LOOPBACK, Collector, free_port, running_service, serve_model, study_files, wait_for

__all__ = ["serve_model"]


def test_orthanc_sends_a_study_and_gets_the_sr_back(tmp_path, serve_model):
    """Upload to Orthanc over REST, ask it to C-STORE the study to ctedge, wait for the SR in
    the same study in Orthanc."""
    require(ORTHANC)
    study_uid = write_study(tmp_path / "study", np.random.default_rng(31), True, slices=10, patient_id="PACS-1")
    dicom_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port)
    try:
        for file in study_files(tmp_path / "study"):
            orthanc_study = orthanc.rest("/instances", file.read_bytes())["ParentStudy"]
        with running_service(tmp_path, serve_model, dicom_port=dicom_port,
                             destination=[Destination("ORTHANC", LOOPBACK, orthanc.dicom_port)]) as service:
            orthanc.rest("/modalities/ctedge/store", orthanc_study.encode())

            def sr_in_orthanc():
                series = orthanc.rest(f"/studies/{orthanc_study}/series")
                return [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]

            sr_series = wait_for(sr_in_orthanc, timeout=30, what="the SR in Orthanc")
            record = service.records[study_uid]
            # sent again, now with the SR in it: the SR is acknowledged, no instance is new, no second answer
            orthanc.rest("/modalities/ctedge/store", orthanc_study.encode())
            time.sleep(0.6)  # two quiet periods
            assert len(sr_in_orthanc()) == 1 and service.records[study_uid].version == 1
        instance = sr_series[0]["Instances"][0]
        tags = orthanc.rest(f"/instances/{instance}/simplified-tags")
    finally:
        orthanc.stop()
    assert tags["StudyInstanceUID"] == study_uid and tags["PatientID"] == "PACS-1"
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert record.summary["slices_used"] > 0 and record.sent


def test_dcmtk_storescu_and_echoscu(tmp_path, serve_model):
    """dcmtk's clients talk to the node: C-ECHO succeeds, a study sent by storescu comes back as an SR."""
    require(STORESCU)
    require(ECHOSCU)
    study_uid = write_study(tmp_path / "study", np.random.default_rng(32), False, slices=10)
    collector = Collector().start()
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination]) as service:
            port = str(service.node.port)
            echo = subprocess.run([str(ECHOSCU), "-aec", "CTEDGE", LOOPBACK, port], capture_output=True, text=True)
            assert echo.returncode == 0, echo.stderr
            sent = subprocess.run([str(STORESCU), "-aec", "CTEDGE", LOOPBACK, port,
                                   *map(str, study_files(tmp_path / "study"))], capture_output=True, text=True)
            assert sent.returncode == 0, sent.stderr
            wait_for(lambda: collector.received, what="the SR")
    finally:
        collector.stop()
    assert read_sr(collector.received[0])["study_uid"] == study_uid
