"""The SR and the Secondary Capture the node sends: valid for dciodvfy (dicom3tools), read
unambiguously, the same UIDs for the same answer on any spool, built despite a type-2 value
highdicom refuses; a Secondary Capture that fails does not stop the SR."""

from __future__ import annotations

import io
import logging
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctedge.core.phantom_studies import write_study
from ctedge.edge.runtime import Classifier
from ctedge.edge.serve import assembler as assembler_module
from ctedge.edge.serve.capture import build_capture
from ctedge.edge.serve.pipeline import classify_spooled
from ctedge.edge.serve.sr import Algorithm, build_sr, read_sr, sr_bytes
from ctedge.edge.study import StudyOptions
from serve_fixtures import Collector, running_service, send_files, serve_model, study_files, wait_for
from test_serve_pacs import require

__all__ = ["serve_model"]
DCIODVFY = Path("/usr/bin/dciodvfy")
ALGORITHM = Algorithm("ctedge test", "0.0", "ab" * 32, 0.5)


@pytest.fixture(scope="module")
def answered(tmp_path_factory, serve_model):
    """A phantom study classified as the node does it: (folder, Answer)."""
    folder = tmp_path_factory.mktemp("sr-study")
    study_uid = write_study(folder, np.random.default_rng(70), True, slices=8, patient_id="P-70")
    return folder, classify_spooled(Classifier(serve_model, runtime="onnxruntime"), folder, study_uid,
                                    StudyOptions())


PRIVATE_SCHEME_WARNING = "Warning - Unrecognized defined term <99CTEDGE> for value 1 of attribute <Coding Scheme Designator>"


def _dciodvfy(data: bytes, tmp_path: Path) -> list[str]:
    """dciodvfy's errors and warnings, but those about DICOMDIR keys the phantom study lacks."""
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    done = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines()
            if line.startswith(("Error", "Warning")) and "needed to build DICOMDIR" not in line]


def test_the_sr_and_the_capture_pass_dciodvfy(answered, tmp_path):
    """No error from dciodvfy for a COMPLETE SR, a PARTIAL one that supersedes it, and the
    Secondary Capture; the SRs' one warning left is dciodvfy not knowing the private scheme of the
    one code DICOM has none for ("slices used"), though it is declared (this dicom3tools warns
    about the declaration itself too)."""
    require(DCIODVFY)
    _, answer = answered
    first = sr_bytes(build_sr(answer.result, answer.evidence, ALGORITHM, 1))
    second = sr_bytes(build_sr(answer.result, answer.evidence, ALGORITHM, 2, first, incomplete="a gap"))
    capture = sr_bytes(build_capture(answer.result, answer.evidence, ALGORITHM, 1))
    assert [_dciodvfy(data, tmp_path) for data in (first, second)] == [[PRIVATE_SCHEME_WARNING] * 2] * 2
    assert [line for line in _dciodvfy(capture, tmp_path) if line.startswith("Error")] == []
    assert pydicom.dcmread(io.BytesIO(second)).CompletionFlag == "PARTIAL"


def test_the_sr_reads_unambiguously_and_its_uids_are_the_answers(answered):
    """Finding "COVID-19" with value Present/Absent; slices used an integer; SOP, series and
    tracking UIDs derived from (study, model, version): rebuilt, the same; another version or
    model, others."""
    _, answer = answered
    sr = build_sr(answer.result, answer.evidence, ALGORITHM, 1)
    read = read_sr(sr)
    assert read["finding"] == ("Present" if answer.result.probability >= 0.5 else "Absent")
    group = sr.ContentSequence[-1].ContentSequence[-1]
    slices = next(item for item in group.ContentSequence
                  if item.ConceptNameCodeSequence[0].CodeMeaning == "Slices used")
    assert str(slices.MeasuredValueSequence[0].NumericValue) == str(answer.result.slices_used)

    def uids(dataset) -> tuple:
        tracking = [item.UID for item in dataset.ContentSequence[-1].ContentSequence[-1].ContentSequence
                    if item.ValueType == "UIDREF"]
        return str(dataset.SOPInstanceUID), str(dataset.SeriesInstanceUID), tuple(tracking)

    again = build_sr(answer.result, answer.evidence, ALGORITHM, 1)
    other_model = Algorithm(ALGORITHM.name, ALGORITHM.version, "cd" * 32, ALGORITHM.threshold)
    assert uids(sr) == uids(again) and len(uids(sr)[2]) == 1
    assert len({uids(sr), uids(build_sr(answer.result, answer.evidence, ALGORITHM, 2)),
                uids(build_sr(answer.result, answer.evidence, other_model, 1))}) == 3


def test_a_type_2_value_highdicom_refuses_is_left_empty_with_a_warning(answered, caplog):
    """PatientBirthDate "1961-05-12" (not DA): the SR is built, that attribute empty, the warning
    names the attribute, never its value."""
    _, answer = answered
    evidence = [ds.copy() for ds in answer.evidence]
    for ds in evidence:
        ds.PatientBirthDate = "1961-05-12"
    caplog.clear()  # pydicom warned, with the value, when this test set it
    with caplog.at_level(logging.WARNING):
        sr = build_sr(answer.result, evidence, ALGORITHM, 1)
        capture = build_capture(answer.result, evidence, ALGORITHM, 1)
    assert sr.PatientID == "P-70" and "PatientBirthDate" in sr
    assert not sr.PatientBirthDate and not capture.PatientBirthDate
    assert "PatientBirthDate is not a valid DA value; left empty" in caplog.text and "1961" not in caplog.text


def test_a_failed_secondary_capture_does_not_stop_the_sr(tmp_path, serve_model, monkeypatch):
    """The SC fails to build: the SR still goes, the answer says the SC failed."""
    def broken(*args):
        raise ValueError("no plot today")

    monkeypatch.setattr(assembler_module, "build_capture", broken)
    study_uid = write_study(tmp_path / "s", np.random.default_rng(71), True, slices=8, scout=False)
    collector = Collector().start()
    try:
        with running_service(tmp_path, serve_model, destination=[collector.destination], quiet_seconds=0.1,
                             secondary_capture=True) as service:
            assert send_files(study_files(tmp_path / "s"), service.node.port) == [0] * 8
            view = wait_for(lambda: (v := service.study_view(study_uid)[1]).get("sent") and v, what="the SR sent")
    finally:
        collector.stop()
    assert [read_sr(ds)["study_uid"] for ds in collector.received] == [study_uid]
    assert view["status"] == "answered" and [d["kind"] for d in view["deliveries"]] == ["sr"]
    assert view["secondary_capture_error"] == "no Secondary Capture could be built (ValueError: no plot today)"
