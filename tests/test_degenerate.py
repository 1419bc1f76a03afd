"""A constant model never passes silently: export refuses it, bench and predict warn."""

import json

import numpy as np
from typer.testing import CliRunner

from ctedge.cli import app
from helpers import brightness_onnx, gray_image

runner = CliRunner()


def flat_images(folder):
    """Three images of mean gray level 40, 60 and 80 (with a little texture)."""
    import cv2

    folder.mkdir()
    for i, level in enumerate((40, 60, 80)):
        texture = gray_image(40, seed=i).astype(int) % 9 - 4
        cv2.imwrite(str(folder / f"img{i}.png"), (level + texture).astype(np.uint8))
    return folder


def test_predict_and_bench_warn_when_outputs_are_constant(tmp_path):
    images = flat_images(tmp_path / "images")
    constant = brightness_onnx(tmp_path / "constant.onnx", gain=0.0)  # P = 0.5 for every image
    varying = brightness_onnx(tmp_path / "varying.onnx", gain=0.1)  # P from 0.12 to 0.88
    for model, warned in ((constant, True), (varying, False)):
        result = runner.invoke(app, ["predict", str(model), str(images), "--json", str(tmp_path / "p.json")])
        assert result.exit_code == 0, result.output
        warnings = json.loads((tmp_path / "p.json").read_text())["warnings"]
        assert bool(warnings) == warned and ("effectively constant" in result.stderr) == warned
    result = runner.invoke(app, ["bench", str(constant), str(varying), "--data", str(images), "--runs", "1",
                                 "--warmup", "0", "--batch-sizes", "1", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    assert rows[str(constant)]["output_spread"] == 0.0 and rows[str(constant)]["constant_warning"]
    assert rows[str(varying)]["output_spread"] > 1e-3 and rows[str(varying)]["constant_warning"] is None
    assert result.stderr.count("effectively constant") == 1


def test_export_refuses_a_constant_model_unless_told(tmp_path, phantom_data):
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.training.model import ModelConfig, build_model

    model = build_model(ModelConfig(weights="none", backbone="tiny", units=4), PreprocessConfig(image_size=32))
    output = model.get_layer("head_output")
    output.set_weights([np.zeros_like(w) for w in output.get_weights()])  # P = sigmoid(0) always
    model.save(tmp_path / "constant.keras")
    result = runner.invoke(app, ["export", str(tmp_path / "constant.keras"), "--onnx", "-o",
                                 str(tmp_path / "c.onnx"), "--check-data", str(phantom_data), "--check-count", "8"])
    assert result.exit_code == 3, result.output
    assert "effectively constant" in result.stderr and "--allow-constant" in result.stderr
    assert not (tmp_path / "c.onnx").exists()


def test_export_records_the_output_spread_in_the_model_card(exported):
    path, report = exported
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["output_spread"] == report["output_spread"]
    assert card["output_spread"]["value"] > 1e-3 and card["output_spread"]["constant"] is False
    assert card["output_spread"]["images"] == 16
