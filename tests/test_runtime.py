import json
import shutil

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.errors import CtedgeError
from helpers import brightness_onnx, write_dicom

runner = CliRunner()


def test_runtime_matches_the_keras_model(onnx_model, trained_run, phantom_data):
    from ctedge.edge.runtime import Classifier
    from ctedge.training.model import load_model

    clf = Classifier(onnx_model, provider="cpu")
    files = sorted((phantom_data / "CT_COVID").iterdir())[:4]
    rows = clf.predict_files(files, batch_size=3)
    keras_model = load_model(trained_run / "model.keras")
    expected = keras_model.predict(np.stack([clf.load(f) for f in files]), verbose=0)[:, 0]
    np.testing.assert_allclose([r.probability for r in rows], expected, atol=1e-4)
    assert [r.path for r in rows] == [str(f) for f in files]
    assert all(r.label == ("CT_COVID" if r.probability >= 0.5 else "CT_NonCOVID") for r in rows)


def test_a_missing_provider_is_refused_naming_the_install(onnx_model, monkeypatch):
    """One device is asked for; onnxruntime without it is an error, not a quiet CPU run."""
    import onnxruntime as ort

    from ctedge.edge.runtime import Classifier

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(CtedgeError, match=r"TensorrtExecutionProvider is not available.*ctedge\[cuda\]"):
        Classifier(onnx_model, provider="tensorrt")
    clf = Classifier(onnx_model)  # auto: the best device here
    assert clf.providers == ["CPUExecutionProvider"] and clf.device == "cpu" and clf.fixed_batch is None


def test_models_that_are_not_ctedge_onnx_are_refused(tmp_path, onnx_model):
    import onnx

    from ctedge.edge.runtime import Classifier

    (tmp_path / "junk.onnx").write_text("not onnx")
    with pytest.raises(CtedgeError, match="junk.onnx: not a loadable ONNX model"):
        Classifier(tmp_path / "junk.onnx")
    proto = onnx.load(onnx_model)
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    with pytest.raises(CtedgeError, match="bare.onnx: ONNX model has no ctedge metadata"):
        Classifier(tmp_path / "bare.onnx")


def test_predict_reports_bad_files_and_goes_on(tmp_path, onnx_model, phantom_data):
    good = sorted((phantom_data / "CT_COVID").iterdir())[0]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    cv2.imwrite(str(folder / "one_pixel.png"), np.array([[128]], np.uint8))
    cv2.imwrite(str(folder / "deep.png"), (np.random.default_rng(0).integers(0, 65535, (40, 40))).astype(np.uint16))
    cv2.imwrite(str(folder / "rgba.png"), np.full((30, 30, 4), 120, np.uint8))
    write_dicom(folder / "norescale.dcm", np.zeros((8, 8)), rescale=False)
    write_dicom(folder / "slice.dcm", np.full((8, 8), -300.0))
    result = runner.invoke(app, ["predict", str(onnx_model), str(folder), str(good),
                                 "--json", str(tmp_path / "p.json"), "--csv", str(tmp_path / "p.csv")])
    assert result.exit_code == 1, result.output
    rows = {json.loads(json.dumps(r))["path"].split("/")[-1]: r
            for r in json.loads((tmp_path / "p.json").read_text())["predictions"]}
    assert {n for n, r in rows.items() if r["error"]} == {"empty.png", "text.png", "truncated.png",
                                                          "norescale.dcm", "one_pixel.png"}
    for name in ("deep.png", "rgba.png", "slice.dcm", good.name):
        assert 0.0 <= rows[name]["probability"] <= 1.0
    assert "RescaleSlope" in rows["norescale.dcm"]["error"]
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 10
    assert "Traceback" not in result.output


def test_huge_image_is_predicted(tmp_path, onnx_model):
    from ctedge.edge.runtime import Classifier

    big = np.zeros((4096, 4096), np.uint8)
    cv2.circle(big, (2048, 2048), 1200, 200, -1)
    cv2.imwrite(str(tmp_path / "big.png"), big)
    (row,) = Classifier(onnx_model).predict_files([tmp_path / "big.png"])
    assert row.error is None and 0 <= row.probability <= 1


def test_bench_reports_latency_cold_start_and_budget(tmp_path, onnx_model, phantom_data):
    result = runner.invoke(app, ["bench", str(onnx_model), "--data", str(phantom_data), "--runs", "3",
                                 "--warmup", "1", "--batch-sizes", "1,2", "--budget-ms", "5000",
                                 "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md"),
                                 "--plot", str(tmp_path / "lat.png")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    (r,) = report["results"]
    assert set(r["latency"]) == {"1", "2"}
    lat = r["latency"]["1"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["cold_start_ms"]["process_to_first_prediction"] > r["cold_start_ms"]["first_inference"]
    assert r["end_to_end_ms"]["p50"] > 0 and 0 <= r["auc"] <= 1
    assert r["budget"]["within"] == (r["end_to_end_ms"]["p50"] <= 5000)
    assert report["machine"]["cores"] >= 1 and "onnxruntime" in report["machine"]
    assert "| model |" in (tmp_path / "b.md").read_text() and (tmp_path / "lat.png").is_file()


def test_bench_without_models_needs_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["bench"])
    assert result.exit_code == 2 and "ctedge export --onnx" in result.stderr


def test_bench_skips_unreadable_images_in_its_data(tmp_path, onnx_model, phantom_data):
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "a_broken.png").write_text("not an image")  # sorts first: it used to stop the run
    shutil.copy(next((phantom_data / "CT_COVID").glob("*.png")), folder / "b_good.png")
    result = runner.invoke(app, ["bench", str(onnx_model), "--data", str(folder), "--runs", "2", "--warmup", "1",
                                 "--batch-sizes", "1", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["data"].endswith("1 images from " + str(folder) + ", 1 unreadable skipped")
    assert report["results"][0]["auc"] is None  # a flat folder has no labels


def test_each_model_gets_the_preprocessing_contract_it_was_exported_under(tmp_path):
    """Contract 1 (no number in older exports) padded before resizing; 2 resizes first.
    On a non-square image with sharp edges they differ, so each model gets its own."""
    from ctedge.core.preprocess import to_model_input
    from ctedge.edge.runtime import Classifier

    gray = np.zeros((37, 90), np.uint8)
    gray[:, ::7] = 255  # sharp vertical lines: a sub-pixel shift shows
    cv2.imwrite(str(tmp_path / "wide.png"), gray)
    old = Classifier(brightness_onnx(tmp_path / "old.onnx", size=32))
    new = Classifier(brightness_onnx(tmp_path / "new.onnx", size=32, contract=2))
    assert (old.contract, new.contract) == (1, 2)
    as_old, as_new = old.load(tmp_path / "wide.png"), new.load(tmp_path / "wide.png")
    np.testing.assert_allclose(as_old, to_model_input(gray.astype(np.float32), 32, contract=1))
    np.testing.assert_allclose(as_new, to_model_input(gray.astype(np.float32), 32, contract=2))
    assert np.abs(as_old - as_new).max() > 20
