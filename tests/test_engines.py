"""Runtimes behind one Classifier: onnxruntime and OpenVINO on a stand-in model
(helpers.brightness_onnx: builds in milliseconds, no TensorFlow)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.errors import CtedgeError
from ctedge.edge import engines
from ctedge.edge.runtime import Classifier
from helpers import brightness_onnx, gray_image

runner = CliRunner()
HAS_BF16 = "BF16" in engines.ov_capabilities("CPU")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two labelled class folders whose brightness predicts the class, plus one broken file."""
    root = tmp_path_factory.mktemp("bright-data")
    for name, level in (("CT_COVID", 120), ("CT_NonCOVID", 20)):
        (root / name).mkdir()
        for i in range(6):
            cv2.imwrite(str(root / name / f"{name}_{i}.png"),
                        np.clip(gray_image(40, seed=i).astype(int) // 4 + level, 0, 255).astype(np.uint8))
    return root


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "ov-cache")


def test_openvino_gives_the_rows_onnxruntime_gives(model, images, tmp_path, cache):
    (tmp_path / "broken.png").write_text("not an image")
    files = (sorted(images.glob("CT_COVID/*.png"))[:3] + sorted(images.glob("CT_NonCOVID/*.png"))[:2]
             + [tmp_path / "broken.png"])
    ort_rows = Classifier(model, runtime="onnxruntime").predict_files(files, batch_size=4)
    ov = Classifier(model, runtime="openvino", precision="fp32", cache_dir=cache)
    ov_rows = ov.predict_files(files, batch_size=4)
    assert (ov.runtime, ov.precision, ov.threshold, ov.size) == ("openvino", "fp32", 0.5, 32)
    assert [r.path for r in ov_rows] == [r.path for r in ort_rows] == [str(f) for f in files]
    assert [r.label for r in ov_rows] == [r.label for r in ort_rows]
    np.testing.assert_allclose([r.probability for r in ov_rows[:5]], [r.probability for r in ort_rows[:5]],
                               atol=1e-6)
    assert ov_rows[-1].error and ov_rows[-1].probability is None
    assert {r.label for r in ov_rows[:5]} == {"CT_COVID", "CT_NonCOVID"}  # not a constant model
    assert any(engines.Path(cache).iterdir()), "the compiled model was not cached"


def test_bf16_runs_in_bf16_or_is_refused(model, cache):
    x = np.stack([np.full((32, 32, 3), v, np.float32) for v in (20, 60, 120)])
    if HAS_BF16:
        clf = Classifier(model, runtime="openvino", precision="bf16", cache_dir=cache)
        assert clf.providers == ["OpenVINO CPU bf16"]
        np.testing.assert_allclose(clf.predict_arrays(x), Classifier(model, runtime="onnxruntime").predict_arrays(x),
                                   atol=0.02)
    else:
        with pytest.raises(CtedgeError, match="no BF16 support"):
            Classifier(model, runtime="openvino", precision="bf16", cache_dir=cache)


def test_wrong_precision_for_the_engine_is_refused(model):
    with pytest.raises(CtedgeError, match="use --runtime openvino --precision bf16"):
        Classifier(model, runtime="onnxruntime", precision="bf16")
    with pytest.raises(CtedgeError, match="bright_int8.onnx not found.*--int8"):
        Classifier(model, runtime="onnxruntime", precision="int8")
    with pytest.raises(CtedgeError, match="bright_ov_int8.xml not found.*--openvino"):
        Classifier(model, runtime="openvino", precision="int8")
    with pytest.raises(CtedgeError, match="^precision must be fp32, bf16, fp16, int8, not 'fp64'"):
        Classifier(model, precision="fp64")
    with pytest.raises(CtedgeError, match="^runtime must be auto, onnxruntime, openvino, not 'tvm'"):
        Classifier(model, runtime="tvm")


def test_auto_uses_the_saved_bench_choice_only_for_this_machine(tmp_path, cache):
    model = brightness_onnx(tmp_path / "m.onnx")
    assert Classifier(model, cache_dir=cache).runtime == "onnxruntime"  # nothing saved: onnxruntime
    choice = {"runtime": "openvino", "precision": "fp32", "provider": "cpu", "machine": engines.machine_key()}
    engines.choice_path(model).write_text(json.dumps(choice))
    clf = Classifier(model, cache_dir=cache)
    assert (clf.runtime, clf.precision) == ("openvino", "fp32")
    assert Classifier(model, runtime="onnxruntime").runtime == "onnxruntime"  # explicit beats saved
    engines.choice_path(model).write_text(json.dumps({**choice, "machine": "another CPU x64"}))
    assert Classifier(model, cache_dir=cache).runtime == "onnxruntime"


def test_a_missing_engine_names_the_extra(model, monkeypatch):
    real = engines.installed
    monkeypatch.setattr(engines, "installed", lambda name: name != "openvino" and real(name))
    with pytest.raises(CtedgeError, match=r'^runtime openvino needs openvino: pip install "ctedge\[openvino\]"'):
        Classifier(model, runtime="openvino")
    monkeypatch.setattr(engines, "installed", lambda name: False)
    result = runner.invoke(app, ["predict", str(model), str(model)])
    assert result.exit_code == 2 and "no inference engine is installed" in result.stderr
    assert 'ctedge[cpu]' in result.stderr and "Traceback" not in result.output


def test_predict_cli_takes_runtime_and_precision(model, images, tmp_path, cache):
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["predict", str(model), str(images), "--runtime", "openvino", "--precision",
                                 "fp32", "--cache-dir", cache, "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["runtime"], report["precision"]) == ("openvino", "fp32")
    assert len(report["predictions"]) == 12
    bad = runner.invoke(app, ["predict", str(model), str(images), "--precision", "fp64"])
    assert bad.exit_code == 2 and "fp64" in bad.stderr


def test_bench_runtime_all_scores_every_variant_and_saves_the_fastest(tmp_path, images, cache):
    model = brightness_onnx(tmp_path / "m.onnx")
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", str(model), "--runtime", "all", "--data", str(images), "--runs", "3",
                                 "--warmup", "1", "--batch-sizes", "1,2", "--cache-dir", cache, "--json", str(out),
                                 "--markdown", str(tmp_path / "b.md")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    variants = [(r["runtime"], r["precision"]) for r in report["results"]]
    assert variants[:2] == [("onnxruntime", "fp32"), ("openvino", "fp32")]
    assert (("openvino", "bf16") in variants) == HAS_BF16
    for r in report["results"]:
        detail = r["accuracy_detail"]
        assert detail["n"] == 12 and detail["auc_ci"][0] <= detail["auc"] <= detail["auc_ci"][1]
        assert r["vs_fp32"]["images"] == 12 and "auc_change" in r["vs_fp32"]
        assert set(r["latency"]) == {"1", "2"}
    assert report["accuracy_data"] == f"all 12 images of {images}"
    assert "fastest within tolerance for m.onnx" in result.output
    markdown = (tmp_path / "b.md").read_text()
    assert "ISA: AVX2" in markdown and "fastest within tolerance" in markdown
    best = report["fastest"][str(model)]
    saved = json.loads(engines.choice_path(model).read_text())
    assert (saved["runtime"], saved["precision"]) == (best["runtime"], best["precision"])
    clf = Classifier(model, cache_dir=cache)
    assert (clf.runtime, clf.precision) == (best["runtime"], best["precision"])


def test_bench_accuracy_on_one_split_only(tmp_path, images):
    from ctedge.edge.bench import BenchOptions, accuracy_files

    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train_COVID.txt").write_text("CT_COVID_0.png\nCT_COVID_1.png\n")
    (splits / "val_COVID.txt").write_text("CT_COVID_2.png\nCT_COVID_3.png\n")
    (splits / "val_NonCOVID.txt").write_text("CT_NonCOVID_4.png\n")
    paths, labels, where = accuracy_files(BenchOptions(data=str(images), split_dir=str(splits)))
    assert sorted(p.name for p in paths) == ["CT_COVID_2.png", "CT_COVID_3.png", "CT_NonCOVID_4.png"]
    assert sorted(labels) == [0, 1, 1] and where == f"all 3 images of the val split of {images}"


def test_openvino_path_imports_no_training_stack(model, images, cache):
    image = next(images.rglob("*.png"))
    code = ("import sys; from ctedge.edge.runtime import Classifier; "
            f"c = Classifier({str(model)!r}, runtime='openvino', cache_dir={cache!r}); "
            f"assert c.predict_files([{str(image)!r}])[0].probability is not None; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'sklearn', 'nncf', "
            "'onnxruntime')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_openvino_cache_is_reused_but_never_stale(tmp_path, cache):
    model = brightness_onnx(tmp_path / "m.onnx", threshold=0.5)
    assert Classifier(model, runtime="openvino", cache_dir=cache).threshold == 0.5
    assert len(list(engines.Path(cache).glob("*/ctedge-metadata.json"))) == 1
    assert Classifier(model, runtime="openvino", cache_dir=cache).threshold == 0.5  # warm start
    brightness_onnx(model, threshold=0.7, gain=-0.1)  # the same file name, a new model
    clf = Classifier(model, runtime="openvino", cache_dir=cache)
    x = np.full((1, 32, 32, 3), 120, np.float32)
    assert clf.threshold == 0.7 and clf.predict_arrays(x)[0] < 0.5  # the new gain, not the cached blob
    assert len(list(engines.Path(cache).glob("*/ctedge-metadata.json"))) == 1  # the old version's folder went


GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def gpu_build_without_tensorrt(monkeypatch):
    """onnxruntime-gpu's provider list on a machine without TensorRT's libraries."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_BUILD))
    monkeypatch.setattr(engines, "tensorrt_loadable", lambda: False)


def test_tensorrt_without_its_libraries_runs_on_cuda_and_says_so(gpu_build_without_tensorrt, caplog):
    assert engines.resolve_providers("tensorrt") == GPU_BUILD[1:]
    assert "libnvinfer" in caplog.text
    assert engines.resolve_providers("auto") == GPU_BUILD[1:]


def test_a_provider_that_does_not_start_is_reported_and_stdout_stays_clean(monkeypatch, capsys, caplog):
    """onnxruntime prints its fallback to stdout; `predict --json -` must not get it."""
    import onnxruntime as ort

    class FallingBack:
        def __init__(self, *args, **kwargs):
            print("*************** EP Error ***************")

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", FallingBack)
    engines.ort_session(ort, "m.onnx", None, GPU_BUILD[1:])
    out = capsys.readouterr()
    assert out.out == "" and "EP Error" in out.err
    assert "CUDAExecutionProvider could not start" in caplog.text
