"""Whole CT studies: reading, series selection, ordering, lung slices, aggregation, CLI.

Every study here is written with pydicom by ctedge.core.phantom_studies (64 px, 12-16 slices,
shuffled extension-less names); the model is the brightness stand-in, whose
P(positive) grows with the mean pixel, so ground-glass slices score higher.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import threading
import time
import zipfile

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core import dicom
from ctedge.core.errors import CtedgeError
from ctedge.core.phantom_studies import (
    fixed_uid,
    phantom_slice,
    write_scout,
    write_series,
    write_study,
)
from ctedge.core.results import StudyEvaluation
from ctedge.edge import study as st
from ctedge.edge.runtime import Classifier

runner = CliRunner()
OPACITY = (7, 8, 9)  # slices with ground glass in the positive patients' flat-lung volumes


@pytest.fixture(scope="module")
def clf(model):
    return Classifier(model)


def flat_volume(rng, positive: bool, slices: int = 12, no_lung: tuple = (0, 11)) -> np.ndarray:
    """Same-size lungs in every slice but ``no_lung``; ground glass in OPACITY if positive."""
    return np.stack([phantom_slice(rng, 64, 0.0 if k in no_lung else 1.0, positive and k in OPACITY)
                     for k in range(slices)])


def patient(folder, rng, positive: bool, patient_id: str, **volume) -> str:
    uid = fixed_uid(rng)
    write_series(folder, flat_volume(rng, positive, **volume), rng, study_uid=uid, patient_id=patient_id)
    write_scout(folder, rng, uid, patient_id)
    return uid


def only(results):
    assert len(results) == 1, [r.to_dict() for r in results]
    return results[0]


def test_axial_ct_series_is_chosen_and_others_rejected_with_reasons(tmp_path, clf):
    rng = np.random.default_rng(0)
    uid = patient(tmp_path, rng, True, "P1")
    more = flat_volume(rng, False, slices=14)
    derived = write_series(tmp_path, more, rng, study_uid=uid, image_type=("DERIVED", "SECONDARY", "MPR"))
    sagittal = write_series(tmp_path, more, rng, study_uid=uid, orientation=(0, 1, 0, 0, 0, -1))
    result = only(st.predict_studies(clf, [tmp_path]))
    reasons = {r.series_uid: r.reason for r in result.series_rejected}
    assert result.error is None and result.slices_total == 12
    assert result.series_uid not in reasons and len(reasons) == 3
    assert "LOCALIZER" in " ".join(reasons.values())
    assert "DERIVED" in reasons[pydicom.dcmread(derived[0]).SeriesInstanceUID]
    assert "not axial" in reasons[pydicom.dcmread(sagittal[0]).SeriesInstanceUID]


def test_slices_are_ordered_by_position_and_top_k_finds_the_ground_glass(tmp_path, clf):
    rng = np.random.default_rng(1)
    patient(tmp_path / "pos", rng, True, "P1")
    patient(tmp_path / "neg", rng, False, "P2")
    pos, neg = st.predict_studies(clf, [tmp_path / "pos", tmp_path / "neg"], st.StudyOptions(top_k=3))
    positions = [s.position_mm for s in pos.slices]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert np.allclose(np.diff(positions), 2.5)
    assert {s.index for s in pos.top_slices} == set(OPACITY)
    assert pos.slices_used == 10 and pos.slices_without_lung == 2
    assert pos.probability > neg.probability
    p = np.array([s.probability for s in pos.slices])
    assert pos.probability == pytest.approx(np.sort(p)[-3:].mean())
    assert pos.label == clf.label(pos.probability)


class Parallel:
    """A classifier serving ``parallel`` calls at once: records each call's batch size
    and how many calls ran at once (each call sleeps, the first longest, so calls
    overlap and finish out of order)."""

    def __init__(self, clf, parallel: int):
        self.clf, self.parallel, self.sizes, self.running, self.most = clf, parallel, [], 0, 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.clf, name)

    def predict_arrays(self, images):
        with self.lock:
            self.sizes.append(len(images))
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.1 if len(self.sizes) == 1 else 0.02)
        try:
            return self.clf.predict_arrays(images)
        finally:
            with self.lock:
                self.running -= 1


def test_an_engine_serving_calls_at_once_gets_single_slices_that_many_at_once(tmp_path, clf):
    rng = np.random.default_rng(1)
    patient(tmp_path, rng, True, "P1", slices=16, no_lung=(0, 15))
    one_at_a_time = only(st.predict_studies(clf, [tmp_path]))
    parallel = Parallel(clf, 3)
    at_once = only(st.predict_studies(parallel, [tmp_path]))
    assert parallel.sizes == [1] * 14 and parallel.most == 3
    assert [(s.index, s.probability) for s in at_once.slices] == [(s.index, s.probability)
                                                                  for s in one_at_a_time.slices]
    assert at_once.probability == one_at_a_time.probability and at_once.slices_used == 14


def test_aggregates_and_their_order():
    p = np.array([0.1, 0.2, 0.9, 0.7])
    assert st.aggregate(p, "max") == pytest.approx(0.9)
    assert st.aggregate(p, "mean") == pytest.approx(0.475)
    assert st.aggregate(p, "topk", 2) == pytest.approx(0.8)
    assert st.aggregate(p, "topk", 10) == pytest.approx(0.475)  # k beyond the slices: all of them
    with pytest.raises(CtedgeError, match="^aggregate must be one of topk, max, mean"):
        st.aggregate(p, "median")


def test_lung_criterion_and_a_study_without_lung(tmp_path, clf):
    rng = np.random.default_rng(2)
    assert st.lung_fraction(phantom_slice(rng, 64, 0.0, False)) < st.LUNG_MIN_FRACTION
    assert st.lung_fraction(phantom_slice(rng, 64, 1.0, False)) > st.LUNG_MIN_FRACTION
    assert st.lung_fraction(phantom_slice(rng, 512, 1.0, True)) > st.LUNG_MIN_FRACTION
    patient(tmp_path, rng, False, "P3", no_lung=tuple(range(12)))
    result = only(st.predict_studies(clf, [tmp_path]))
    assert result.probability is None and "no slice with lung" in result.error


def test_slice_step_and_the_default_bound():
    assert st.sample_indices(16, 2, 64) == (list(range(0, 16, 2)), 2)
    indices, step = st.sample_indices(300, None, 64)
    assert step == 5 and len(indices) == 60 and indices[0] == 2  # centred: 2 .. 297
    assert st.sample_indices(10, None, 64) == (list(range(10)), 1)


def test_two_studies_in_a_folder_and_the_same_folder_zipped(tmp_path, clf):
    rng = np.random.default_rng(3)
    folder = tmp_path / "pacs"
    patient(folder / "a", rng, True, "P1")
    patient(folder / "b", rng, False, "P2")
    (folder / "README.txt").write_text("not dicom")
    archive = tmp_path / "pacs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder))
    options = st.StudyOptions(slice_step=2)
    from_folder = st.predict_studies(clf, [folder], options)
    from_zip = st.predict_studies(clf, [archive], options)
    assert sorted(r.patient_id for r in from_folder) == ["P1", "P2"]
    by_study = {r.study_uid: r.probability for r in from_folder}
    assert by_study == {r.study_uid: r.probability for r in from_zip}
    assert all(r.slices_sampled == 6 and r.slice_step == 2 for r in from_zip)
    assert any("not DICOM" in w and "README.txt" in w for w in from_folder[0].warnings)


def test_bad_slices_are_reported_and_the_rest_goes_on(tmp_path, clf):
    rng = np.random.default_rng(4)
    uid = patient(tmp_path, rng, True, "P1", slices=16, no_lung=())
    files = {}
    for path in sorted(tmp_path.iterdir()):
        ds = pydicom.dcmread(path)
        if ds.SeriesDescription != "SCOUT":
            files[round(float(ds.ImagePositionPatient[2]) / 2.5)] = path
            axial = ds.SeriesInstanceUID
    truncated = files[3]
    truncated.write_bytes(truncated.read_bytes()[:-3000])
    ds = pydicom.dcmread(files[5])
    del ds.RescaleSlope
    ds.save_as(files[5])
    ds = pydicom.dcmread(files[6])
    ds.ImagePositionPatient = [0.0, 0.0, "nan"]
    ds.save_as(files[6])
    files[10].unlink()  # a gap
    shutil.copy(files[12], tmp_path / "copy_of_12")  # a duplicate position
    other = write_series(tmp_path / "odd", flat_volume(rng, False, slices=1, no_lung=())[:, :32, :32], rng,
                         study_uid=uid, series_uid=axial, patient_id="P1")[0]
    result = only(st.predict_studies(clf, [tmp_path]))
    text = "\n".join(result.warnings)
    assert result.error is None and result.probability is not None
    assert f"{truncated}: cannot decode pixel data" in text
    assert f"{files[5]}: no RescaleSlope/RescaleIntercept" in text
    assert f"{files[6]}: ImagePositionPatient must be 3 finite numbers" in text
    assert f"{other}: matrix 32x32" in text
    assert "duplicate position" in text and "gap of 5.0 mm" in text
    # 16 written - 1 gap + 1 copy + 1 odd = 17; ordered: minus rescale, nan, odd size, duplicate
    assert result.slices_total == 13 and result.slices_used == 12  # the truncated one fails to decode


def test_no_ct_series_structured_report_and_bad_zip(tmp_path, clf):
    rng = np.random.default_rng(5)
    uid = fixed_uid(rng)
    write_series(tmp_path / "mr", flat_volume(rng, False), rng, study_uid=uid, modality="MR")
    sr = pydicom.Dataset()
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.file_meta.MediaStorageSOPInstanceUID = fixed_uid(rng)
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = uid, fixed_uid(rng), "SR"
    sr.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    empty = tmp_path / "empty"
    empty.mkdir()
    folder, bad_zip, nothing = st.predict_studies(clf, [tmp_path / "mr", tmp_path / "broken.zip", empty])
    assert folder.error is None and "no series meets the rules" in folder.not_eligible  # an outcome, not an error
    assert "modality MR" in folder.not_eligible and folder.probability is None
    assert "unreadable zip" in bad_zip.error and "no DICOM image files" in nothing.error
    shutil.copy(tmp_path / "report.dcm", tmp_path / "mr" / "report.dcm")
    with_sr = only(st.predict_studies(clf, [tmp_path / "mr"]))
    assert "modality SR" in with_sr.not_eligible


def test_series_override(tmp_path, clf):
    rng = np.random.default_rng(6)
    uid = fixed_uid(rng)
    axial = write_series(tmp_path, flat_volume(rng, False), rng, study_uid=uid)
    scout = write_scout(tmp_path, rng, uid, "P1")
    axial_uid, scout_uid = (pydicom.dcmread(p[0]).SeriesInstanceUID for p in (axial, scout))
    chosen = only(st.predict_studies(clf, [tmp_path], st.StudyOptions(series_uid=axial_uid)))
    assert chosen.series_uid == axial_uid and chosen.error is None
    refused = only(st.predict_studies(clf, [tmp_path], st.StudyOptions(series_uid=scout_uid)))
    assert refused.probability is None and "LOCALIZER" in refused.error and scout_uid in refused.error
    missing = only(st.predict_studies(clf, [tmp_path], st.StudyOptions(series_uid="1.2.3")))
    assert "not in this study" in missing.error


def test_compressed_series_decodes_and_a_missing_plugin_names_the_extra(tmp_path, clf, monkeypatch):
    from pydicom.uid import RLELossless

    rng = np.random.default_rng(7)
    patient(tmp_path / "plain", rng, True, "P1")
    shutil.copytree(tmp_path / "plain", tmp_path / "rle")
    for path in (tmp_path / "rle").iterdir():
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)  # pydicom's own RLE encoder
        ds.save_as(path)
    plain, rle = st.predict_studies(clf, [tmp_path / "plain", tmp_path / "rle"])
    assert rle.error is None and rle.probability == pytest.approx(plain.probability, abs=1e-6)
    monkeypatch.setattr(dicom, "decoder_available", lambda uid: (False, "pylibjpeg-rle"))
    refused = only(st.predict_studies(clf, [tmp_path / "rle"]))
    assert "RLE Lossless" in refused.error and 'pip install "ctedge[dicom-codecs]"' in refused.error


def test_nifti_volume_and_a_message_without_nibabel(tmp_path, clf, monkeypatch):
    nibabel = pytest.importorskip("nibabel", reason="nibabel is in the test extra")
    rng = np.random.default_rng(8)
    volume = flat_volume(rng, True)  # (z, rows, cols) in radiological view
    ras = np.ascontiguousarray(volume[:, ::-1, ::-1].transpose(2, 1, 0))  # -> (x, y, z) RAS+
    nibabel.save(nibabel.Nifti1Image(ras, np.diag([0.7, 0.7, 2.5, 1.0])), tmp_path / "ct.nii.gz")
    result = only(st.predict_studies(clf, [tmp_path / "ct.nii.gz"], st.StudyOptions(top_k=3)))
    assert result.error is None and result.slices_total == 12
    assert {s.index for s in result.top_slices} == set(OPACITY)
    over = only(st.predict_studies(clf, [tmp_path / "ct.nii.gz"], st.StudyOptions(max_pixels=64 * 64 - 1)))
    assert "above the" in over.error and "--max-pixels" in over.error
    monkeypatch.setitem(sys.modules, "nibabel", None)
    refused = only(st.predict_studies(clf, [tmp_path / "ct.nii.gz"]))
    assert 'pip install "ctedge[nifti]"' in refused.error


def test_cli_predict_study_writes_json_csv_and_plots(tmp_path, model):
    """Study P1 given twice (its folder and a zip of it) gets two plots, not one overwritten."""
    rng = np.random.default_rng(9)
    write_study(tmp_path / "p1", rng, True, patient_id="P1")
    write_study(tmp_path / "p2", rng, False, patient_id="P2")
    again = shutil.make_archive(str(tmp_path / "p1-again"), "zip", tmp_path / "p1")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(model), str(tmp_path / "p1"), str(tmp_path / "p2"), again,
                                 str(tmp_path / "missing"), "--study", "--aggregate", "max",
                                 "--json", str(out / "s.json"), "--csv", str(out / "s.csv"),
                                 "--plot", str(out / "plots")])
    assert result.exit_code == 1, result.output  # the missing study fails, the others go on
    studies = json.loads((out / "s.json").read_text())["studies"]
    assert [s["patient_id"] for s in studies] == ["P1", "P2", "P1", ""]
    first = studies[0]
    for key in ("study_uid", "series_uid", "slices_total", "slices_used", "probability", "label",
                "top_slices", "warnings", "error", "slices"):
        assert key in first
    assert first["probability"] == max(s["probability"] for s in first["slices"])
    assert list(first["top_slices"][0]) == st.SliceScore.keys() and first["top_slices"][0]["sop_instance_uid"]
    assert studies[3]["error"] == "no such file or folder"
    assert len((out / "s.csv").read_text().strip().splitlines()) == 5
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert len(plots) == 3 and plots[0].startswith("P1_") and plots[1] == plots[0].replace(".png", "_2.png")


@pytest.mark.parametrize("failure", ["engine", "interrupt"])
def test_a_model_failing_mid_run_keeps_the_studies_answered_before_it(tmp_path, model, monkeypatch, failure):
    """The engine raising on the second study (memory, a lost device), or Ctrl-C there: the first
    study's row is in --csv and --json, and the command says what happened, exiting 1 (or 130
    when interrupted). It lost every row."""
    from ctedge.edge.study import pipeline

    rng = np.random.default_rng(11)
    write_study(tmp_path / "p1", rng, True, patient_id="P1")
    write_study(tmp_path / "p2", rng, False, patient_id="P2")
    classify = pipeline.classify_study

    def failing_on_p2(clf, study, options):
        if study.patient_id == "P2":
            raise KeyboardInterrupt if failure == "interrupt" else RuntimeError("CUDA failure 700: an illegal "
                                                                                "memory access")
        return classify(clf, study, options)

    monkeypatch.setattr(pipeline, "classify_study", failing_on_p2)
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(model), str(tmp_path / "p1"), str(tmp_path / "p2"), "--study",
                                 "--json", str(out / "s.json"), "--csv", str(out / "s.csv")])
    cause = "interrupted" if failure == "interrupt" else "the model failed: RuntimeError: CUDA failure 700"
    assert result.exit_code == (130 if failure == "interrupt" else 1), result.output
    assert f"stopped after 1 stud(ies) ({cause}" in result.stderr and "rows are written" in result.stderr
    document = json.loads((out / "s.json").read_text())
    assert [s["patient_id"] for s in document["studies"]] == ["P1"]
    assert any(f"stopped after 1 stud(ies) ({cause}" in w for w in document["warnings"])
    with open(out / "s.csv") as f:
        assert [row["patient_id"] for row in csv.DictReader(f)] == ["P1"]


def test_plot_without_matplotlib_names_the_eval_extra(tmp_path, model, monkeypatch):
    """matplotlib comes with [eval] (the edge box's evaluation extra), not only [train]."""
    write_study(tmp_path / "p1", np.random.default_rng(9), True, patient_id="P1", slices=4, size=32)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "ctedge.core.plots", raising=False)
    for command in (["predict", str(model), str(tmp_path / "p1"), "--study", "--plot", str(tmp_path / "plots")],
                    ["bench", str(model), "--plot", str(tmp_path / "latency.png")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "ctedge[eval]" in result.stderr, result.output


def test_cli_refuses_bad_options_and_unwritable_outputs_before_work(tmp_path, model):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args, needle in ((["--aggregate", "median"], "--aggregate"), (["--slice-step", "0"], "--slice-step"),
                         (["--json", str(blocker / "x.json")], "--json")):
        result = runner.invoke(app, ["predict", str(model), str(tmp_path), "--study", *args])
        assert result.exit_code == 2 and needle in result.output, result.output


def test_bench_study_splits_the_stages(tmp_path, model):
    write_study(tmp_path / "s", np.random.default_rng(11), True, slices=12)
    result = runner.invoke(app, ["bench", str(model), "--study", str(tmp_path / "s"), "--study-runs", "1",
                                 "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    (report,) = json.loads((tmp_path / "b.json").read_text())["reports"]
    run = report["runs"][0]
    assert set(st.STAGES) <= set(run) and run["slices_total"] == 12
    assert 0 < run["slices_used"] <= run["slices_sampled"] == 12
    assert run["wall_s"] >= run["pipeline_wall_s"] >= run["inference"] > 0
    assert run["slices_per_s"] == pytest.approx(run["slices_used"] / run["wall_s"])
    assert report["session_s"] > 0 and "process_wall_s" not in report  # no subprocess from the library


def test_evaluate_study_scores_patients_and_names_failures(tmp_path, model):
    """Patient-level evaluation through the ONNX path: one row per study, CIs by
    PatientID (two studies of P3 count as one patient), a broken study named and
    not scored (exit 1), --threshold overriding the metadata's. (That it needs no
    TensorFlow: the import contracts, and CI's edge install runs it.)"""
    rng = np.random.default_rng(12)
    data = tmp_path / "data"
    for i, positive in enumerate((True, True, True, False, False, False)):
        cls = "CT_COVID" if positive else "CT_NonCOVID"
        write_study(data / cls / f"s{i}", rng, positive, slices=12, patient_id=f"P{min(i, 3)}" if i < 5 else "")
    shutil.make_archive(str(data / "CT_COVID" / "s0"), "zip", data / "CT_COVID" / "s0")
    shutil.rmtree(data / "CT_COVID" / "s0")
    (data / "CT_NonCOVID" / "broken").mkdir()
    (data / "CT_NonCOVID" / "broken" / "notes.txt").write_text("no images")
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(model), str(data), "--study", "--threshold", "0.86",
                                 "--resamples", "50", "-o", str(out), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 1, result.output  # the broken study
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["unit"] == "study" and report["threshold"] == 0.86
    assert (report["studies"], report["positive"], report["patients"]) == (6, 3, 5)
    assert [f["input"] for f in report["failed"]] == [str(data / "CT_NonCOVID" / "broken")]
    assert "broken" in result.output and "not in the metrics" in result.output
    assert report["metrics"]["auc"]["value"] == 1.0  # ground glass is brighter: the stand-in ranks it first
    assert report["metrics"]["accuracy"]["value"] == 1.0  # and 0.86 lies between the classes here
    assert sum(map(sum, report["confusion"])) == 6
    assert (out / "roc.png").is_file() and (out / "calibration.png").is_file() and (out / "metrics.json").is_file()
    with open(out / "studies.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and sum(bool(r["error"]) for r in rows) == 1
    assert {r["label"] for r in rows if r["truth"] == "1"} == {"CT_COVID"}
    assert any(r["input"].endswith("s0.zip") and r["probability"] for r in rows)
    assert list(report) == StudyEvaluation.keys()
    assert json.loads((out / "metrics.json").read_text()) == report  # the library's record, as --json prints it


def test_evaluate_studies_returns_its_typed_record(tmp_path, model):
    """The library builds the StudyEvaluation (the CLI only prints it); the budgets in
    its StudyOptions reach the Classifier and every slice."""
    from ctedge.evaluation.evaluate import evaluate_studies

    rng = np.random.default_rng(13)
    for i, positive in enumerate((True, True, False, False)):
        write_study(tmp_path / "data" / ("CT_COVID" if positive else "CT_NonCOVID") / f"s{i}", rng, positive,
                    slices=8, patient_id=f"P{i}")
    report = evaluate_studies(model, tmp_path / "data", out_dir=tmp_path / "e", resamples=20)
    assert isinstance(report, StudyEvaluation) and report.failed == []
    assert (report.studies, report.patients, report.positive) == (4, 4, 2)
    assert report.out_dir == str(tmp_path / "e") and report.studies_csv == str(tmp_path / "e" / "studies.csv")
    assert json.loads((tmp_path / "e" / "metrics.json").read_text()) == report.to_dict()
    with pytest.raises(CtedgeError, match="none of the 4 studies"):
        evaluate_studies(model, tmp_path / "data", out_dir=tmp_path / "f", options=st.StudyOptions(max_pixels=1000))


def test_evaluate_study_refuses_a_keras_model_and_an_image_folder(tmp_path, model, phantom_data):
    result = runner.invoke(app, ["evaluate", str(tmp_path / "model.keras"), str(phantom_data), "--study"])
    assert result.exit_code == 2 and "ONNX" in result.output
    result = runner.invoke(app, ["evaluate", str(model), str(phantom_data), "--study", "-o", str(tmp_path / "e")])
    assert result.exit_code == 2 and "studies (folders, .zip or NIfTI)" in result.output, result.output
    result = runner.invoke(app, ["evaluate", str(model), str(phantom_data)])
    assert result.exit_code == 2 and "--study" in result.output


def test_study_slices_keep_to_the_pixel_budget(tmp_path, model):
    """Slices above --max-pixels are refused from their header, like single images."""
    write_study(tmp_path / "s", np.random.default_rng(11), True, slices=8)
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["--max-pixels", "1000", "predict", str(model), str(tmp_path / "s"), "--study",
                                 "--json", str(out)])
    assert result.exit_code == 1, result.output
    (study,) = json.loads(out.read_text())["studies"]
    assert study["probability"] is None and "above the 0.001 MP limit" in study["error"]
    result = runner.invoke(app, ["predict", str(model), str(tmp_path / "s"), "--study", "--json", str(out)])
    assert result.exit_code == 0 and json.loads(out.read_text())["studies"][0]["probability"] is not None
