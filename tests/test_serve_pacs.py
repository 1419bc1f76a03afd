"""`ctedge serve` with programs nobody here wrote: a real PACS (Orthanc) and dcmtk's
storescu/echoscu (``orthanc_fixture``: missing binaries skip these tests, unless
CTEDGE_REQUIRE_PACS=1, as in .ci/run, where they fail)."""

from __future__ import annotations

import subprocess

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
            answer = wait_for(lambda: (view := service.study_view(study_uid)[1])["sent"] and view, what="sent")
            # sent again, now with the SR in it (acknowledged, not kept): nothing new, no second answer,
            # the same SR delivered again (an admin's fix for a lost SR)
            orthanc.rest("/modalities/ctedge/store", orthanc_study.encode())
            first_sent = answer["deliveries"][0]["sent_at"]
            wait_for(lambda: service.study_view(study_uid)[1]["deliveries"][0]["sent_at"] > first_sent,
                     what="the SR delivered again")
            again = service.study_view(study_uid)[1]
            assert len(sr_in_orthanc()) == 1 and again["version"] == 1 and again["sent"]
        instance = sr_series[0]["Instances"][0]
        tags = orthanc.rest(f"/instances/{instance}/simplified-tags")
    finally:
        orthanc.stop()
    assert tags["StudyInstanceUID"] == study_uid and tags["PatientID"] == "PACS-1"
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert answer["result"]["slices_used"] > 0 and answer["sent"]


def test_dcmtk_storescu_and_echoscu(tmp_path, serve_model):
    """dcmtk's clients talk to the node: C-ECHO succeeds, a study sent by storescu comes back as an
    SR; a compressed (RLE) study fails with storescu's defaults (uncompressed proposals only) and
    goes with the flag of its compression, as the README says."""
    import pydicom
    from pydicom.uid import RLELossless

    require(STORESCU)
    require(ECHOSCU)
    study_uid = write_study(tmp_path / "study", np.random.default_rng(32), False, slices=10)
    write_study(tmp_path / "rle", np.random.default_rng(33), False, slices=3, scout=False)
    compressed = study_files(tmp_path / "rle")
    for path in compressed:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
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
            plain, flagged = (subprocess.run([str(STORESCU), *flags, "-aec", "CTEDGE", LOOPBACK, port,
                                              *map(str, compressed)], capture_output=True, text=True)
                              for flags in ([], ["-xr"]))
            held = {n for (n,) in service.journal.rows("SELECT instances FROM studies WHERE study_uid != ?",
                                                        (study_uid,))}
    finally:
        collector.stop()
    assert read_sr(collector.received[0])["study_uid"] == study_uid
    assert "unable to convert" in plain.stderr and "Store Failed" in plain.stderr
    assert flagged.returncode == 0, flagged.stderr
    assert held == {3}
