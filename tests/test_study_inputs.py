"""Study inputs as data (datasets and bytes in memory), the one DICOM path, typed
results, and hostile inputs: special files, unreadable files, zip and gzip bombs,
corrupt archives, lying NIfTI headers, non-finite values, too few positions.

Small generated inputs only (bombs are declared sizes or sparse files, never
inflated), each test in well under 10 s.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.dicom import dataset_hu
from ctedge.core.errors import CtedgeError, UnreadableImage
from ctedge.core.imageio import read_image
from ctedge.core.phantom_studies import fixed_uid, phantom_slice, write_series, write_study
from ctedge.edge import study as st
from ctedge.edge.runtime import Classifier
from helpers import brightness_onnx, write_dicom

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return brightness_onnx(tmp_path_factory.mktemp("model") / "brightness.onnx", size=32)


@pytest.fixture(scope="module")
def clf(model):
    return Classifier(model)


def lung_volume(rng, slices: int = 12) -> np.ndarray:
    return np.stack([phantom_slice(rng, 64, 1.0, False) for _ in range(slices)])


def series(folder: Path, seed: int = 0, slices: int = 12, **kwargs) -> list[Path]:
    rng = np.random.default_rng(seed)
    return write_series(folder, lung_volume(rng, slices), rng, study_uid=fixed_uid(rng), patient_id="P1", **kwargs)


def only(results):
    assert len(results) == 1, [r.to_dict() for r in results]
    return results[0]


def edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


# --- inputs as data ------------------------------------------------------------------

def test_datasets_and_bytes_in_memory_give_the_files_answer(tmp_path, clf):
    paths = series(tmp_path / "s", tags={"AccessionNumber": "ACC1", "StudyDate": "20260101",
                                         "PatientName": "Doe^Jane"})
    from_files = only(st.predict_studies(clf, [tmp_path / "s"]))
    (study,) = st.study_from_datasets([pydicom.dcmread(p) for p in paths], "received")
    from_memory = st.classify_study(clf, study, st.StudyOptions())
    (from_bytes_study,) = st.study_from_bytes([p.read_bytes() for p in paths], "bytes")
    from_bytes = st.classify_study(clf, from_bytes_study)
    assert from_files.error is None and from_memory.probability == from_files.probability == from_bytes.probability
    assert from_memory.accession_number == "ACC1" and from_memory.study_date == "20260101"
    assert from_memory.attributes["PatientName"] == "Doe^Jane" and from_memory.attributes["StudyTime"] == ""
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in paths}
    assert {s.sop_instance_uid for s in from_memory.slices} <= uids and from_memory.top_slices


def test_header_values_are_what_pydicom_reads(tmp_path):
    """The header scan converts each value once, without the Dataset's lookups: the same
    values as pydicom's own reading, in explicit and implicit VR and a UTF-8 name."""
    from pydicom.uid import ImplicitVRLittleEndian

    (path,) = series(tmp_path / "s", slices=1, tags={"SpecificCharacterSet": "ISO_IR 192",
                                                     "PatientName": "Müller^Zoë", "AccessionNumber": "A7"})
    implicit = pydicom.dcmread(path)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(tmp_path / "implicit.dcm", enforce_file_format=True)
    for file in (path, tmp_path / "implicit.dcm"):
        (study,) = st.find_studies(file)
        (ref,) = next(iter(study.series.values()))
        ds = pydicom.dcmread(file)
        assert (ref.sop_uid, ref.modality, ref.rows, ref.position) == (
            ds.SOPInstanceUID, ds.Modality, ds.Rows, tuple(map(float, ds.ImagePositionPatient)))
        assert ref.attributes["PatientName"] == str(ds.PatientName) == "Müller^Zoë"
        assert ref.attributes["AccessionNumber"] == "A7" and ref.problem is None and ref.has_rescale
    assert pydicom.dcmread(tmp_path / "implicit.dcm").file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_the_model_may_load_while_the_first_headers_are_read(tmp_path, clf, monkeypatch):
    """predict_studies takes a Future of the classifier: it reads the first input's headers,
    then waits for the model; the answer is the loaded model's; a failed load raises."""
    from concurrent.futures import Future

    from ctedge.edge.study import pipeline

    series(tmp_path / "s")
    loading, real = Future(), pipeline.find_studies

    def scan(*args):
        assert not loading.done()  # headers are read while the model still loads
        studies = real(*args)
        loading.set_result(clf)
        return studies

    monkeypatch.setattr(pipeline, "find_studies", scan)
    result = only(st.predict_studies(loading, [tmp_path / "s"]))
    monkeypatch.setattr(pipeline, "find_studies", real)
    assert result.error is None and result.probability == only(st.predict_studies(clf, [tmp_path / "s"])).probability
    failed = Future()
    failed.set_exception(CtedgeError("model not found: m.onnx"))
    with pytest.raises(CtedgeError, match="model not found"):
        st.predict_studies(failed, [tmp_path / "s"])


def test_options_are_checked_when_made_and_the_threshold_never_touches_the_model(tmp_path, clf):
    with pytest.raises(CtedgeError, match="^top_k must be at least 1, not 0"):
        st.StudyOptions(top_k=0)
    with pytest.raises(CtedgeError, match="^max_bytes must be at least 1"):
        st.StudyOptions(max_bytes=0)
    with pytest.raises(CtedgeError, match="^threshold must be between 0 and 1"):
        st.StudyOptions(threshold=1.5)
    series(tmp_path)
    before = clf.threshold
    strict = only(st.predict_studies(clf, [tmp_path], st.StudyOptions(threshold=0.999)))
    assert strict.threshold == 0.999 and strict.label == clf.negative and clf.threshold == before


# --- one DICOM path --------------------------------------------------------------------

def test_one_dataset_to_hu_function_for_images_and_studies(tmp_path):
    hu = np.linspace(-1000, 400, 64).reshape(8, 8).astype(np.float32)
    path = write_dicom(tmp_path / "a.dcm", hu, slope=2.0, intercept=-2048.0)
    np.testing.assert_allclose(dataset_hu(pydicom.dcmread(path)), hu, atol=1)
    edit(path, PhotometricInterpretation="MONOCHROME1")  # a display inversion: the rescaled values stay HU
    np.testing.assert_allclose(dataset_hu(pydicom.dcmread(path)), hu, atol=1)
    padded = write_dicom(tmp_path / "p.dcm", np.full((8, 8), 40.0), PixelPaddingValue=0)
    ds = pydicom.dcmread(padded)
    ds.PixelData = np.where(np.eye(8, dtype=bool), 0, 1064).astype(np.uint16).tobytes()
    out = dataset_hu(ds)
    assert (out[np.eye(8, dtype=bool)] == -1000).all() and (out[~np.eye(8, dtype=bool)] == 40).all()
    edit(path, PhotometricInterpretation="PALETTE COLOR")
    with pytest.raises(UnreadableImage, match="a.dcm.*PALETTE COLOR.*refused"):
        read_image(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("slope,needle", [("NaN", "RescaleSlope is 'NaN'"), ("inf", "RescaleSlope is 'inf'"),
                                          ("1e39", "RescaleSlope is '1e39'")])
def test_a_non_finite_rescale_is_named_not_labelled(tmp_path, clf, slope, needle):
    path = write_dicom(tmp_path / "one.dcm", np.full((8, 8), -600.0))
    edit(path, RescaleSlope=slope)
    with pytest.raises(UnreadableImage, match=needle):
        read_image(path)
    paths = series(tmp_path / "s")
    for p in paths:
        edit(p, RescaleSlope=slope)
    result = only(st.predict_studies(clf, [tmp_path / "s"]))
    assert result.probability is None and needle in result.error and "ImagePositionPatient" not in result.error


def test_float_pixel_data_is_read_and_nan_is_an_error(tmp_path):
    path = write_dicom(tmp_path / "f.dcm", np.zeros((4, 4)), rescale=False)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    del ds.PixelRepresentation
    ds.FloatPixelData = np.full((4, 4), -500.0, np.float32).tobytes()
    ds.save_as(path)
    np.testing.assert_allclose(dataset_hu(pydicom.dcmread(path)), -500.0)
    ds.FloatPixelData = np.array([np.nan] + [0.0] * 15, np.float32).tobytes()
    ds.save_as(path)
    with pytest.raises(UnreadableImage, match="1 non-finite pixel value"):
        read_image(path)


def test_orientation_of_zeros_is_named_not_called_not_axial(tmp_path, clf):
    for p in series(tmp_path):
        edit(p, ImageOrientationPatient=[0, 0, 0, 0, 0, 0])
    result = only(st.predict_studies(clf, [tmp_path]))
    assert "not two directions at right angles" in result.error and "not axial" not in result.error


def test_too_few_positions_or_too_many_failed_slices_give_no_answer(tmp_path, clf):
    stacked = series(tmp_path / "one", slices=20)
    for p in stacked:
        edit(p, ImagePositionPatient=[0.0, 0.0, 5.0])
    result = only(st.predict_studies(clf, [tmp_path / "one"]))
    assert result.probability is None and "only 1 distinct slice position" in result.error
    paths = sorted(series(tmp_path / "half", slices=12))
    for p in paths[:7]:
        p.write_bytes(p.read_bytes()[:-2000])  # pixel data cut short
    result = only(st.predict_studies(clf, [tmp_path / "half"]))
    assert result.probability is None and "7 of the 12 sampled slices could not be decoded" in result.error


def test_each_file_slice_is_parsed_once(tmp_path, clf, monkeypatch):
    """The header scan parses a file (or zip member) once and remembers where its pixel
    data start; decoding reads only the rest (no second dcmread, no codec-check read), a
    zip member inflated whole once, when its slice is decoded."""
    paths = series(tmp_path / "s")
    with zipfile.ZipFile(tmp_path / "s.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for p in paths:
            z.write(p, p.name)
    calls = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda fp, *a, **k: calls.append(getattr(fp, "name", fp)) or
                        real(fp, *a, **k))
    files, zipped = st.predict_studies(clf, [tmp_path / "s", tmp_path / "s.zip"])
    assert files.error is None and files.slices_sampled == len(paths) and zipped.probability == files.probability
    assert sorted(calls) == sorted([*map(str, paths), *(p.name for p in paths)])


# --- special, unreadable and hostile files -------------------------------------------------

def test_a_fifo_is_never_opened_and_the_batch_goes_on(tmp_path, clf):
    series(tmp_path / "s")
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "s" / "inner.dcm")
    results: list = []
    worker = threading.Thread(target=lambda: results.extend(st.predict_studies(clf, [fifo, tmp_path / "s"])),
                              daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "a FIFO blocked the reader"
    piped, folder = results
    assert "not a regular file (FIFO)" in piped.error
    assert folder.error is None and any("special file" in w and "FIFO" in w for w in folder.warnings)


def test_unreadable_files_and_folders_are_named_as_such(tmp_path, clf, monkeypatch):
    """Permission checks (faked: the tests may run as root, who reads everything)."""
    series(tmp_path / "s")
    locked = write_dicom(tmp_path / "s" / "locked.dcm", np.zeros((8, 8)))
    (tmp_path / "s" / "sub").mkdir()
    real_access, real_scandir = os.access, os.scandir
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))

    def scandir(path="."):
        if Path(path).name == "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = only(st.predict_studies(clf, [tmp_path / "s"]))
    text = "\n".join(result.warnings)
    assert result.error is None and f"{locked}: unreadable (permission denied)" in text
    assert "sub: folder unreadable (Permission denied)" in text and "not DICOM" not in text


def lie_about_size(archive: Path, size: int) -> None:
    """Patch the zip's headers so its one entry claims ``size`` bytes uncompressed."""
    data = bytearray(archive.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, size)
    struct.pack_into("<I", data, central + 24, size)
    archive.write_bytes(bytes(data))


def test_zip_entries_keep_to_the_byte_budget_before_inflating(tmp_path, clf):
    paths = series(tmp_path / "s")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("huge.dcm", paths[0].read_bytes())
    lie_about_size(bomb, 2**31)  # a 2 GB entry, as a bomb declares it
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as z:
        for p in paths:
            z.write(p, p.name)
    refused, answered = st.predict_studies(clf, [bomb, good])
    assert "2,147,483,648 bytes uncompressed is above the" in refused.error and "--max-bytes" in refused.error
    assert answered.error is None
    small = only(st.predict_studies(clf, [good], st.StudyOptions(max_bytes=1000)))
    assert small.probability is None and "above the 1,000-byte budget" in small.error
    result = runner.invoke(app, ["--max-bytes", "1000", "predict", str(clf.path), str(good), "--study"])
    assert result.exit_code == 1 and "1,000-byte" in result.output


def test_a_corrupt_deflate_entry_is_that_slices_problem_and_the_zip_is_closed(tmp_path, clf):
    paths = series(tmp_path / "s", slices=14)
    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for p in paths:
            z.write(p, p.name)
    data = bytearray(archive.read_bytes())
    first = data.find(b"PK\x03\x04")
    name_length, extra = struct.unpack_from("<HH", data, first + 26)
    start = first + 30 + name_length + extra
    data[start:start + 64] = os.urandom(64)  # the first entry's deflate stream
    archive.write_bytes(bytes(data))
    broken_zip = tmp_path / "all-bad.zip"
    broken_zip.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    result, broken = st.predict_studies(clf, [archive, broken_zip])
    assert result.error is None and any("corrupt zip entry" in w for w in result.warnings)
    assert broken.error and "zip" in broken.error
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")]
    assert str(archive) not in fds, "the zip reader left its file open"


nibabel = pytest.importorskip("nibabel", reason="nibabel is in the test extra")


def test_nifti_is_read_lazily_in_any_orientation(tmp_path, clf):
    volume = lung_volume(np.random.default_rng(3))  # (z, rows, cols), radiological view
    ras = np.ascontiguousarray(volume[:, ::-1, ::-1].transpose(2, 1, 0))
    nibabel.save(nibabel.Nifti1Image(ras, np.diag([0.7, 0.7, 2.5, 1.0])), tmp_path / "ras.nii")
    lps_zfirst = np.ascontiguousarray(ras[::-1, ::-1, :].transpose(2, 0, 1))  # voxel axes (z, x, y), x/y flipped
    affine = np.array([[0, -0.7, 0, 0], [0, 0, -0.7, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
    nibabel.save(nibabel.Nifti1Image(lps_zfirst, affine), tmp_path / "other.nii.gz")
    ras_study, other_study = (only(st.find_studies(tmp_path / n)) for n in ("ras.nii", "other.nii.gz"))
    for study in (ras_study, other_study):
        refs = st.order_slices(next(iter(study.series.values())))[0]
        np.testing.assert_allclose(st.slice_hu(refs[4]), volume[4], atol=1e-3)
    assert only(st.predict_studies(clf, [tmp_path / "other.nii.gz"])).probability == pytest.approx(
        only(st.predict_studies(clf, [tmp_path / "ras.nii"])).probability)


def test_a_gzipped_volume_is_inflated_once_and_read_as_the_file_is(tmp_path, clf, monkeypatch):
    """A .nii.gz cannot seek: read slice by slice it was inflated from its start for every
    slice. Now it is inflated once (within the byte budget), and every slice is what
    the uncompressed file gives."""
    volume = lung_volume(np.random.default_rng(5), slices=24).transpose(2, 1, 0).copy()
    image = nibabel.Nifti1Image(volume.astype(np.int16), np.diag([0.7, 0.7, 2.5, 1.0]))
    image.header.set_slope_inter(0.5, -3.0)  # scaled voxels: nibabel's own scaling, bit for bit
    nibabel.save(image, tmp_path / "ct.nii")
    nibabel.save(image, tmp_path / "ct.nii.gz")
    inflated, real = [], gzip._GzipReader.read
    monkeypatch.setattr(gzip._GzipReader, "read", lambda self, *a: inflated.append(len(data := real(self, *a)))
                        or data)
    options = st.StudyOptions(slice_step=1)
    packed = only(st.predict_studies(clf, [tmp_path / "ct.nii.gz"], options))
    assert packed.error is None and packed.slices_sampled == 24
    assert sum(inflated) <= 1.1 * (tmp_path / "ct.nii").stat().st_size
    plain = only(st.predict_studies(clf, [tmp_path / "ct.nii"], options))
    assert [s.probability for s in packed.slices] == [s.probability for s in plain.slices]


def test_nifti_bombs_lies_truncation_and_nan(tmp_path, clf):
    liar = tmp_path / "liar.nii"
    nibabel.save(nibabel.Nifti1Image(np.zeros((1, 1, 1), np.int16), np.eye(4)), liar)
    raw = bytearray(liar.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 7000, 7000, 32767, 1, 1, 1, 1)  # dims the file cannot hold
    liar.write_bytes(bytes(raw))
    small = tmp_path / "small.nii"
    nibabel.save(nibabel.Nifti1Image(np.zeros((64, 64, 12), np.int16), np.eye(4)), small)
    raw = small.read_bytes()
    (tmp_path / "short.nii").write_bytes(raw[:len(raw) // 2])
    gz = gzip.compress(raw)
    (tmp_path / "cut.nii.gz").write_bytes(gz[:len(gz) // 2])
    nan = lung_volume(np.random.default_rng(4)).transpose(2, 1, 0).copy()
    nan[:, :, :7] = np.nan
    nibabel.save(nibabel.Nifti1Image(nan, np.diag([0.7, 0.7, 2.5, 1.0])), tmp_path / "nan.nii.gz")
    results = st.predict_studies(clf, [tmp_path / n for n in ("liar.nii", "short.nii", "cut.nii.gz", "nan.nii.gz")])
    errors = [r.error for r in results]
    assert all(r.probability is None for r in results), errors
    assert "above the" in errors[0] and "budget" in errors[0]
    assert "header claims" in errors[1]
    assert "could not be decoded" in errors[2] and "cannot read NIfTI slice" in errors[2]
    assert "non-finite voxel" in errors[3]


# --- typed results and the CLI ---------------------------------------------------------------

def test_predict_study_json_is_the_dataclasses_schema_and_the_table_shows_the_study(tmp_path, model):
    rng = np.random.default_rng(5)
    write_study(tmp_path / "pacs" / "a", rng, True, slices=12, patient_id="P1")
    write_study(tmp_path / "pacs" / "b", rng, False, slices=12, patient_id="P2")
    out = tmp_path / "s.json"
    result = runner.invoke(app, ["predict", str(model), str(tmp_path / "pacs"), str(tmp_path / "none"), "--study",
                                 "--slice-step", "3", "--json", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    document = json.loads(out.read_text())
    assert list(document) == st.StudiesReport.keys() and document["kind"] == "studies"
    for study in document["studies"]:
        assert list(study) == st.StudyResult.keys()
        for row in study["slices"] + study["top_slices"]:
            assert list(row) == st.SliceScore.keys()
        for row in study["series_rejected"]:
            assert list(row) == st.RejectedSeries.keys()
    uids = [s["study_uid"] for s in document["studies"][:2]]
    assert all(uid[-8:] in result.output for uid in uids)  # the study, not only the folder
    assert "1 slice in 3" in result.output and "3. slice" not in result.output


def test_predict_study_warns_of_a_constant_model(tmp_path):
    flat = brightness_onnx(tmp_path / "flat.onnx", size=32, gain=1e-9)
    for i in range(2):
        series(tmp_path / f"s{i}", seed=i)
    out = tmp_path / "s.json"
    result = runner.invoke(app, ["predict", str(flat), str(tmp_path / "s0"), str(tmp_path / "s1"), "--study",
                                 "--json", str(out)])
    assert result.exit_code == 0 and "effectively constant" in result.output
    assert "effectively constant" in json.loads(out.read_text())["warnings"][0]


def test_bench_study_writes_one_json_for_several_models_and_refuses_runtime_all(tmp_path, model):
    series(tmp_path / "s")
    other = brightness_onnx(tmp_path / "other.onnx", size=32)
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", str(model), str(other), "--study", str(tmp_path / "s"),
                                 "--study-runs", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [Path(r["model"]).name for r in json.loads(out.read_text())["reports"]] == ["brightness.onnx", "other.onnx"]
    result = runner.invoke(app, ["bench", str(model), "--study", str(tmp_path / "s"), "--runtime", "all"])
    assert result.exit_code == 2 and "--runtime" in result.output


def test_evaluate_study_runs_on_the_engine_asked_for(tmp_path, model):
    pytest.importorskip("openvino", reason="OpenVINO is in the test extra")
    rng = np.random.default_rng(6)
    for i, cls in enumerate(("CT_COVID", "CT_NonCOVID", "CT_COVID", "CT_NonCOVID")):
        write_study(tmp_path / "data" / cls / f"s{i}", rng, cls == "CT_COVID", slices=12, patient_id=f"P{i}")
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["evaluate", str(model), str(tmp_path / "data"), "--study", "--runtime", "openvino",
                                 "--cache-dir", str(tmp_path / "cache"), "--resamples", "20",
                                 "-o", str(tmp_path / "eval"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["runtime"] == "openvino"


def test_cuda_study_benchmark_runs_on_the_cpu(tmp_path, model):
    """benchmarks/cuda_study.py --cpu-only: the script the GPU run will use, on a tiny study."""
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "benchmarks" / "cuda_study.py"
    out = tmp_path / "cuda_study"
    done = subprocess.run([sys.executable, str(script), "--cpu-only", "--model", str(model), "--slices", "12",
                           "--size", "64", "--runs", "1", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert row["cpu_pipeline_s"] == row["cpu_fp32_pipeline_s"] > 0 and row["cpu_start_to_answer_s"] > 0
    assert "| cpu_fp32 |" in out.with_suffix(".md").read_text()
