"""`predict --study --from-pacs / --from-dicomweb` against a real PACS: one Orthanc with its
DICOMweb plugin for the module (``orthanc_fixture``), phantom studies of 32 px, the
brightness stand-in model. Each test keeps to its own AccessionNumber prefix.
"""

from __future__ import annotations

import datetime
import json
import logging
import tempfile

import numpy as np
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.phantom_studies import CORONAL, fixed_uid, phantom_volume, write_series
from ctedge.edge.pacs import DimseSource, PullOptions, pull_studies
from ctedge.edge.runtime import Classifier
from ctedge.edge.study import predict_studies
from orthanc_fixture import orthanc
from serve_fixtures import study_files

__all__ = ["orthanc"]
runner = CliRunner()
TODAY = datetime.date.today().strftime("%Y%m%d")


def pacs_study(folder, rng, positive: bool, accession: str, *, scout: bool = True, axial: bool = True,
               patient_id: str | None = None) -> str:
    """A phantom study as a PACS holds it (StudyDate today, an AccessionNumber): an axial series
    and a scout; its StudyInstanceUID."""
    uid = fixed_uid(rng)
    tags = {"StudyDate": TODAY, "AccessionNumber": accession, "BodyPartExamined": "CHEST"}
    patient = patient_id or f"P-{accession}"
    if axial:
        write_series(folder, phantom_volume(rng, 12, 32, positive), rng, study_uid=uid, patient_id=patient, tags=tags)
    if scout:
        write_series(folder, phantom_volume(rng, 2, 32), rng, study_uid=uid, patient_id=patient, orientation=CORONAL,
                     image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="SCOUT", tags=tags)
    return uid


def studies_of(document: dict) -> dict:
    return {s["study_uid"]: s for s in document["studies"]}


def test_pulled_studies_get_the_answers_of_predict_study_on_the_same_files(tmp_path, orthanc, model, caplog):
    """C-FIND + C-GET and QIDO-RS + WADO-RS, each with the default query (CT studies of today):
    the same probabilities as `predict --study` on the files Orthanc holds (<= 1e-6), only the
    chosen series retrieved, a localizer-only study not eligible without retrieving anything.
    The command's log has no line per HTTP request (httpx's, with the query's values in its URLs)."""
    caplog.set_level(logging.INFO)  # the CLI's level
    rng = np.random.default_rng(50)
    uids = [pacs_study(tmp_path / "files", rng, positive, f"EQ{n}") for n, positive in enumerate((True, False))]
    scout_only = pacs_study(tmp_path / "scout", rng, False, "EQ-SCOUT", axial=False)
    orthanc.upload(study_files(tmp_path / "files"))
    orthanc.upload(study_files(tmp_path / "scout"))
    local = tmp_path / "local.json"
    done = runner.invoke(app, ["predict", str(model), str(tmp_path / "files"), "--study", "--json", str(local)])
    assert done.exit_code == 0, done.output
    expected = studies_of(json.loads(local.read_text()))
    for name, flags in (("pacs", ["--from-pacs", orthanc.peer]), ("web", ["--from-dicomweb", orthanc.dicomweb_url])):
        out = tmp_path / f"{name}.json"
        done = runner.invoke(app, ["predict", str(model), "--study", *flags, "--json", str(out)])
        assert done.exit_code == 0, done.output
        pulled = studies_of(json.loads(out.read_text()))
        assert set(uids + [scout_only]) <= set(pulled)
        for uid in uids:
            assert pulled[uid]["series_uid"] == expected[uid]["series_uid"]
            assert pulled[uid]["probability"] == pytest.approx(expected[uid]["probability"], abs=1e-6)
            assert pulled[uid]["slices_used"] == expected[uid]["slices_used"]
            assert pulled[uid]["input"].endswith(uid) and "ctedge-pull-" not in json.dumps(pulled[uid])
            assert pulled[uid]["timings_s"]["retrieve"] > 0
            assert [r["description"] for r in pulled[uid]["series_rejected"]] == ["SCOUT"]  # judged, not retrieved
        assert pulled[scout_only]["error"] is None and "SCOUT" in pulled[scout_only]["not_eligible"]
        assert pulled[scout_only]["timings_s"] == {}  # nothing retrieved
    assert [r.getMessage() for r in caplog.records if r.name.startswith("httpx")] == []


def test_a_study_the_pacs_fails_to_return_is_an_error_row_and_the_others_go_on(tmp_path, orthanc, model,
                                                                             monkeypatch):
    """Orthanc with a study whose files are gone: its C-GET fails (an error row), the other study
    is answered, every temp folder is removed, the command exits 1. (Orthanc's QIDO-RS reads a
    file of each study, so the same breakage fails the whole DICOMweb query there; the DICOMweb
    client's error rows are tested against a fake server in test_pull_hostile.py.)"""
    rng = np.random.default_rng(51)
    good = pacs_study(tmp_path / "good", rng, True, "FAIL-GOOD")
    broken = pacs_study(tmp_path / "broken", rng, False, "FAIL-BROKEN")
    orthanc.upload(study_files(tmp_path / "good"))
    orthanc.break_storage(orthanc.upload(study_files(tmp_path / "broken")))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the pulls' temp folders go
    source = DimseSource(orthanc.peer, options=PullOptions(timeout_s=5, deadline_s=10))
    results = {r.study_uid: r for r in pull_studies(Classifier(model), source, {"AccessionNumber": "FAIL-*"})}
    assert results[good].answered and results[good].probability is not None
    assert results[broken].probability is None and "C-GET of series" in results[broken].error
    assert results[broken].accession_number == "FAIL-BROKEN" and results[broken].input == f"{orthanc.peer}/{broken}"
    assert not list(tmp_path.glob("ctedge-pull-*"))  # every temp folder removed
    done = runner.invoke(app, ["predict", str(model), "--study", "--from-pacs", orthanc.peer,
                               "--query", "AccessionNumber=FAIL-*", "--csv", str(tmp_path / "pulled.csv")])
    assert done.exit_code == 1 and "1 of 2 stud(ies) got no answer" in done.output


def test_when_the_retrieved_files_reveal_a_localizer_the_next_series_is_retrieved(tmp_path, orthanc, model):
    """Series-level C-FIND says nothing of ImageType: a localizer with more instances (and an
    innocent description) is retrieved first, refused on its files, and the axial series next;
    the answer is still that of `predict --study` on the same files."""
    rng = np.random.default_rng(52)
    uid = pacs_study(tmp_path / "files", rng, True, "NEXT-1", scout=False)
    write_series(tmp_path / "files", phantom_volume(rng, 14, 32), rng, study_uid=uid, patient_id="P-NEXT-1",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="THORAX 2",
                 tags={"StudyDate": TODAY, "AccessionNumber": "NEXT-1"})
    orthanc.upload(study_files(tmp_path / "files"))
    clf = Classifier(model)
    pulled, = pull_studies(clf, DimseSource(orthanc.peer), {"AccessionNumber": "NEXT-1"})
    local, = predict_studies(clf, [tmp_path / "files"])
    assert pulled.series_uid == local.series_uid and pulled.probability == pytest.approx(local.probability, abs=1e-6)
    assert [r.description for r in pulled.series_rejected] == ["THORAX 2"]
    assert "LOCALIZER" in pulled.series_rejected[0].reason
