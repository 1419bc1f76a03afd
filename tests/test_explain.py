import json

import cv2
import keras
import numpy as np
from keras import layers
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.imageio import read_image
from ctedge.core.preprocess import to_model_input
from ctedge.evaluation.explain import MIN_SHOWN, explain, grad_cam, to_image_size
from ctedge.training.model import CTPreprocess, add_head

runner = CliRunner()


def brightness_model(size: int = 96) -> keras.Model:
    """A ctedge-shaped classifier (preprocess -> nested backbone -> paper head)
    whose evidence for 'positive' is local brightness, so Grad-CAM must light
    up wherever the bright blob is."""
    inner = keras.Input((size, size, 3))
    fmap = layers.AveragePooling2D(4)(inner)
    backbone = keras.Model(inner, layers.Conv2D(2, 1, activation="relu", name="conv")(fmap), name="backbone")
    backbone.get_layer("conv").set_weights([np.full((1, 1, 3, 2), 1 / 765, np.float32), np.zeros(2, np.float32)])
    inputs = keras.Input((size, size, 3), name="image")
    outputs = add_head(backbone(CTPreprocess(name="ct_preprocess")(inputs)), units=2)
    model = keras.Model(inputs, outputs)
    dense = model.get_layer("head_dense")
    dense.set_weights([np.full(dense.kernel.shape, 0.1, np.float32), np.zeros(2, np.float32)])
    model.get_layer("head_output").set_weights([np.ones((2, 1), np.float32), np.array([-1.0], np.float32)])
    return model


def blob_image(x: int, y: int, height: int = 160, width: int = 64) -> np.ndarray:
    image = np.full((height, width), 20, np.uint8)
    cv2.circle(image, (x, y), 7, 255, -1)
    return image


def test_heatmap_follows_the_blob_through_the_letterbox(tmp_path):
    model = brightness_model()
    model_path = tmp_path / "m.keras"
    model.save(model_path)
    files = []
    for name, x in (("left", 12), ("right", 52)):
        files.append(tmp_path / f"{name}.png")
        cv2.imwrite(str(files[-1]), blob_image(x, 100))
    report = explain(model_path, files, tmp_path / "out", keep_heatmaps=True)
    left, right = report["explanations"]
    for entry, x in ((left, 12), (right, 52)):
        assert entry.heatmap.shape == (160, 64)  # the image's size, not the model's
        peak_x, peak_y = entry.peak_xy
        assert abs(peak_x - x) <= 5 and abs(peak_y - 100) <= 5, entry.peak_xy
    assert left.heatmap[:, :32].max() > 0.9 > 0.5 > left.heatmap[:, 32:].max()
    assert right.heatmap[:, 32:].max() > 0.9 > 0.5 > right.heatmap[:, :32].max()


def test_grad_cam_probability_is_the_models_own(trained_run, phantom_data):
    model = keras.models.load_model(trained_run / "model.keras")
    files = sorted(phantom_data.rglob("*.png"))[::4]
    batch = np.stack([to_model_input(read_image(f).gray, 48) for f in files])
    probabilities, cams = grad_cam(model, batch)
    np.testing.assert_allclose(probabilities, model.predict(batch, verbose=0)[:, 0], atol=1e-5)
    assert cams.shape[0] == len(files) and cams.min() >= 0.0 and cams.max() <= 1.0


def test_to_image_size_undoes_the_letterbox():
    cam = np.zeros((4, 4), np.float32)
    cam[:, 0] = 1.0  # the left quarter of the padded square: for a tall image, only padding
    heat = to_image_size(cam, 40, 20)
    assert heat.shape == (40, 20)
    assert heat[:, :5].max() < 0.5


def test_explain_command_writes_overlays_a_contact_sheet_and_error_rows(tmp_path, trained_run, phantom_data):
    folder = phantom_data / "CT_COVID"
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    out = tmp_path / "explained"
    result = runner.invoke(app, ["explain", str(trained_run / "model.keras"), str(folder), str(broken),
                                 "--out", str(out), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 1, result.output  # one file failed, the rest were explained
    report = json.loads((tmp_path / "e.json").read_text())
    rows = report["explanations"]
    assert len(rows) == 13 and rows[-1]["error"] and "broken.png" in result.stderr
    for row in rows[:-1]:
        picture = cv2.imread(row["overlay"])
        source = cv2.imread(row["path"], cv2.IMREAD_UNCHANGED)
        enlarged = max(1.0, MIN_SHOWN / max(source.shape[:2]))  # small phantoms are shown larger
        assert picture.shape[1] == round(source.shape[1] * enlarged)
        assert picture.shape[0] > round(source.shape[0] * enlarged)  # the caption banner above
        assert 0.0 <= row["probability"] <= 1.0
    assert cv2.imread(report["contact_sheet"]) is not None


def test_explain_refuses_an_onnx_file(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x07")
    result = runner.invoke(app, ["explain", str(onnx), str(tmp_path)])
    assert result.exit_code == 2 and ".keras" in result.stderr and "Traceback" not in result.output


def test_explain_decodes_dicom_with_the_models_window(tmp_path, monkeypatch):
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.evaluation import explain as explain_module
    from ctedge.training.model import ModelConfig, build_model
    from helpers import write_dicom

    model = build_model(ModelConfig(weights="none", backbone="tiny", units=4),
                        PreprocessConfig(image_size=32, window_low=-600.0, window_high=200.0))
    model.save(tmp_path / "m.keras")
    dicom = write_dicom(tmp_path / "slice.dcm", np.linspace(-1000, 400, 32 * 32).reshape(32, 32))
    seen = []
    real = explain_module.read_image
    monkeypatch.setattr(explain_module, "read_image", lambda path, window, max_pixels: seen.append(window) or real(path, window, max_pixels))
    report = explain_module.explain(tmp_path / "m.keras", [dicom], tmp_path / "out", sheet=False)
    assert seen == [(-600.0, 200.0)] and report["explanations"][0].error is None
