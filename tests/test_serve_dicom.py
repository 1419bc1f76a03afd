"""`ctedge serve`'s DICOM side in-process: receive, complete, classify, SR back, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import RLELossless

from ctedge.core.phantom_studies import write_study
from ctedge.edge.runtime import Classifier
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
            wait_for(lambda: collector.received, what="the SR")
            record = service.records[study_uid]
    finally:
        collector.stop()
    assert len(collector.received) == 1
    sr = read_sr(collector.received[0])
    assert sr["study_uid"] == study_uid and sr["patient_id"] == "P-7"
    assert abs(sr["measurements"]["Probability of COVID-19"] - expected.probability) <= 1e-6
    assert sr["measurements"]["Slices used"] == expected.slices_used
    assert sr["finding"] == ("Present" if expected.label == "CT_COVID" else "Absent")
    assert sr["references"] == [top["sop_instance_uid"] for top in record.summary["top_slices"]]
    assert collector.received[0].PatientName == ""  # absent in the input: left empty, not invented
