import json
import os

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.errors import CheckFailed
from ctedge.training import export
from ctedge.training.export import ExportOptions, check_graph, export_onnx, latest_model

runner = CliRunner()


def test_fp32_matches_keras_on_a_trained_model(exported):
    _, report = exported
    check = report["variants"]["fp32"]["parity"]
    assert check["reference_spread"] > 0.01, "parity on a constant model proves nothing"
    assert check["max_abs_diff"] <= 1e-4 and check["decision_agreement"] == 1.0
    assert "auc" in check  # labelled check data


def test_metadata_reads_back_through_onnxruntime(exported):
    path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["ctedge.classes"]) == ["CT_NonCOVID", "CT_COVID"]
    assert json.loads(meta["ctedge.input"])["size"] == 48
    assert json.loads(meta["ctedge.preprocess"])["window_low"] == -1000.0
    assert json.loads(meta["ctedge.preprocess"])["contract"] == 2  # resize, then pad
    assert meta["Image.NominalPixelRange"] == "NominalRange_0_255"
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, out.name) == ("image", ["batch", 48, 48, 3], "probability")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["metadata"]["ctedge.source_model"]["sha256"] == json.loads(meta["ctedge.source_model"])["sha256"]


def test_graph_has_no_training_ops(exported):
    path, _ = exported
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert not ops & export.TRAINING_OPS


def test_fp16_and_int8_variants_have_their_own_cards(exported):
    path, report = exported
    for variant in ("fp16", "int8"):
        card = json.loads(path.with_name(f"tiny_{variant}.json").read_text())
        assert card["variant"] == variant and card["parity"]["status"] in ("ok", "flagged")
        check = card["parity"]
        within = check["max_abs_diff"] <= check["tolerance"] and check["decision_agreement"] == 1.0
        assert check["status"] == ("ok" if within else "flagged")
    assert report["variants"]["fp16"]["parity"]["max_abs_diff"] < 0.05
    assert report["variants"]["fp16"]["size_mb"] < report["variants"]["fp32"]["size_mb"]
    # The weights really changed precision (on the tiny backbone, INT8's QDQ scales
    # outweigh what the int8 weights save, so size alone would not tell).
    fp16 = onnx.load(path.with_name("tiny_fp16.onnx"))
    conv_weights = {n.input[1] for n in fp16.graph.node if n.op_type == "Conv"}
    assert {i.data_type for i in fp16.graph.initializer if i.name in conv_weights} == {onnx.TensorProto.FLOAT16}
    int8 = onnx.load(path.with_name("tiny_int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}
    assert any(i.data_type == onnx.TensorProto.INT8 for i in int8.graph.initializer)


def test_a_variant_beyond_tolerance_is_dropped_and_an_old_file_of_its_name_goes(exported, tmp_path):
    path, report = exported
    images = np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 3)).astype("float32")
    reference = export.engine_probabilities("onnxruntime", path, images)
    check = {"images": images, "labels": None, "source": "random", "reference": reference - 0.2,
             "spread": None}
    target = tmp_path / "m_fp16.onnx"
    target.write_bytes(b"an older export")
    fp16 = export.to_fp16(onnx.load(path))
    card = export._finish_variant(fp16, target, "fp16", 1e-2, {}, check, ExportOptions())
    assert card["parity"]["status"] == "dropped" and card["file"] is None
    assert not target.exists() and not target.with_suffix(".json").exists()
    kept = export._finish_variant(fp16, target, "fp16", 1e-2, {}, check, ExportOptions(keep_flagged=True))
    assert kept["parity"]["status"] == "flagged" and target.is_file()


def test_openvino_ir_passes_the_gate_and_runs_with_its_metadata(exported):
    from ctedge.edge.engines.openvino import capabilities as ov_capabilities
    from ctedge.edge.runtime import Classifier

    path, report = exported
    ir, ir_int8 = path.with_name("tiny_ov.xml"), path.with_name("tiny_ov_int8.xml")
    card = json.loads(path.with_name("tiny_ov.json").read_text())
    assert card["parity"]["status"] == "ok" and card["parity"]["max_abs_diff"] <= 1e-4
    assert card["parity"]["reference_spread"] > 0.01 and "auc" in card["parity"]
    assert ("bf16_parity" in card) == ("BF16" in ov_capabilities("CPU"))
    int8_card = json.loads(path.with_name("tiny_ov_int8.json").read_text())
    assert int8_card["variant"] == "int8" and "ctedge.int8_calibration" in int8_card["metadata"]
    assert report["variants"]["ov-int8"]["file"] == str(ir_int8) and ir_int8.with_suffix(".bin").is_file()
    images = np.random.default_rng(0).uniform(0, 255, (3, 48, 48, 3)).astype(np.float32)
    onnx_p = Classifier(path, runtime="onnxruntime").predict_arrays(images)
    ir_clf = Classifier(ir)  # auto: an IR runs on OpenVINO
    assert (ir_clf.runtime, ir_clf.size, ir_clf.classes, ir_clf.metadata["variant"]) == (
        "openvino", 48, ("CT_NonCOVID", "CT_COVID"), "fp32")
    np.testing.assert_allclose(ir_clf.predict_arrays(images), onnx_p, atol=1e-4)
    int8 = Classifier(path, runtime="openvino", precision="int8")  # finds tiny_ov_int8.xml beside
    assert int8.engine_info.file == str(ir_int8) and int8.metadata["variant"] == "int8"
    assert np.all((int8.predict_arrays(images) >= 0) & (int8.predict_arrays(images) <= 1))


def test_opencv_dnn_gives_the_same_probabilities(exported):
    path, _ = exported
    images = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": images})[0]
    net = cv2.dnn.readNetFromONNX(str(path))
    got = []
    for image in images:
        net.setInput(image[None])
        got.append(net.forward().ravel())
    np.testing.assert_allclose(np.concatenate(got), expected.ravel(), atol=1e-4)


def _broken(path):
    proto = onnx.load(path)
    bias = next(i for i in proto.graph.initializer if "head_output" in i.name and len(i.dims) == 1)
    values = onnx.numpy_helper.to_array(bias) + 3.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
    return proto


def test_a_broken_graph_is_refused_and_nothing_is_written(exported, trained_run, tmp_path, monkeypatch):
    path, _ = exported
    monkeypatch.setattr(export, "convert", lambda model, opset: _broken(path))
    out = tmp_path / "broken.onnx"
    result = runner.invoke(app, ["export", str(trained_run / "model.keras"), "--onnx", "-o", str(out)])
    assert result.exit_code == 3, result.output
    assert "parity check failed" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_training_time_ops_are_refused(exported):
    proto = onnx.load(exported[0])
    proto.graph.node.append(helper.make_node("RandomUniform", [], ["noise"], shape=[1]))
    with pytest.raises(CheckFailed, match="RandomUniform"):
        check_graph(proto)


def test_int8_without_calibration_data_is_a_clear_error(trained_run, tmp_path):
    result = runner.invoke(app, ["export", str(trained_run / "model.keras"), "--onnx", "--int8",
                                 "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "--calibration-data" in result.stderr


def test_without_a_model_the_newest_tuned_one_is_taken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for stamp, name in ((2_000_000_000, "new"), (1_000_000_000, "old")):  # "old" written last
        (tmp_path / "tuning" / name).mkdir(parents=True)
        model = tmp_path / "tuning" / name / "best_model.keras"
        model.write_text(name)
        os.utime(model, (stamp, stamp))
    assert latest_model().parent.name == "new"
    result = runner.invoke(app, ["export", "--onnx"])
    assert "tuning/new/best_model.keras" in result.stderr and result.exit_code == 2


def test_efficientnetb3_itself_converts_with_parity(tmp_path, phantom_data):
    """The one B3 export of the suite: the real backbone's graph through tf2onnx.
    Random weights give features of ~1e-6, so the head is rescaled to standardised
    logits on the phantoms: the outputs spread and parity can fail. (Recomputing the
    BatchNorm statistics instead made 1x1 feature maps at 32 px chaotic: Keras and
    onnxruntime then differed by up to 1e-2 from round-off alone.)"""
    import keras

    from ctedge.core.data import DataOptions
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.core.runconfig import RunConfig
    from ctedge.training.model import ModelConfig, build_model
    from ctedge.training.splits import load_data

    preprocess = PreprocessConfig(image_size=32)
    model = build_model(ModelConfig(weights="none", units=8), preprocess)
    _, parts = load_data(DataOptions(root=str(phantom_data)), preprocess, parts=("train",))
    # called eagerly: predict() would trace B3 first (~6 s here) for 24 images at 32 px
    hidden = keras.ops.convert_to_numpy(keras.Model(model.input, model.get_layer("head_dense").output)(
        parts["train"].x, training=False))
    head = model.get_layer("head_output")
    kernel, bias = head.get_weights()
    logits = hidden @ kernel + bias
    head.set_weights([kernel / logits.std(), (bias - logits.mean()) / logits.std()])
    model.save(tmp_path / "model.keras")
    RunConfig(kind="train", data=DataOptions(root=str(phantom_data)), model=ModelConfig(weights="none", units=8),
              preprocess=preprocess, classes=["CT_NonCOVID", "CT_COVID"]).save(tmp_path / "config.json")
    report = export_onnx(tmp_path / "model.keras", tmp_path / "b3.onnx", ExportOptions(
        check_data=str(phantom_data), check_count=8))
    check = report["variants"]["fp32"]["parity"]
    assert check["reference_spread"] > 0.01, "parity on a constant model proves nothing"
    assert check["max_abs_diff"] <= 1e-4 and check["decision_agreement"] == 1.0
    meta = ort.InferenceSession(str(tmp_path / "b3.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(meta["ctedge.backbone"]) == "b3"
