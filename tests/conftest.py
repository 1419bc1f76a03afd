"""Session-wide fixtures, built once and shared by every test file: phantom data,
one trained run (tiny backbone), one ONNX export with its variants, one tuning
project. No test trains, exports or tunes again what a fixture already has.
Every test makes its own small images (no ../shared, no network)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ctedge.cli import app  # noqa: E402
from ctedge.core.phantoms import make_dataset  # noqa: E402
from helpers import TRAIN_SIZE, brightness_onnx, tune_args  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """The one ONNX stand-in for an exported model (helpers.brightness_onnx, 32 px, with
    ctedge metadata): TensorFlow-free, built in milliseconds. The trained tiny model's
    own export is ``exported``."""
    return brightness_onnx(tmp_path_factory.mktemp("stand-in") / "bright.onnx", size=32)


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory) -> Path:
    """A COVID-CT-like folder: CT_COVID/ and CT_NonCOVID/, 12 phantoms each, 64 px."""
    return make_dataset(tmp_path_factory.mktemp("phantoms"), per_class=12, size=64, seed=1)


@dataclass
class Trained:
    run_dir: Path
    summary: dict  # what `ctedge train --json` printed
    stderr: str


@pytest.fixture(scope="session")
def trained(tmp_path_factory, phantom_data) -> Trained:
    """`ctedge train` as a user runs it (tiny backbone, 48 px, 2 epochs) on the
    phantoms plus one file that is not an image; its outputs differ between
    images, so parity checks on it can fail."""
    root = tmp_path_factory.mktemp("train")
    data = shutil.copytree(phantom_data, root / "data")
    (data / "CT_COVID" / "junk.png").write_text("not an image")
    run_dir = root / "run"
    result = runner.invoke(app, ["train", str(data), "--backbone", "tiny", "--weights", "none",
                                 "--image-size", str(TRAIN_SIZE), "--epochs", "2", "--batch-size", "4",
                                 "--units", "8", "--lr", "1e-3", "-o", str(run_dir),
                                 "--json", str(root / "train.json")])
    assert result.exit_code == 0, result.output
    return Trained(run_dir, json.loads((root / "train.json").read_text()), result.stderr)


@pytest.fixture(scope="session")
def trained_run(trained) -> Path:
    return trained.run_dir


@pytest.fixture(scope="session")
def exported(tmp_path_factory, trained_run, phantom_data):
    """The trained run exported once, with FP16 and INT8 variants and OpenVINO IRs: (path, report)."""
    from ctedge.training.export import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("exports") / "tiny.onnx"
    report = export_onnx(trained_run / "model.keras", out, ExportOptions(
        fp16=True, int8=True, calibration_data=str(phantom_data), calibration_count=8,
        check_data=str(phantom_data), check_count=16, int8_tolerance=1.0, openvino=True,
        keep_flagged=True))
    keep = os.environ.get("CTEDGE_KEEP_TEST_EXPORT")  # .ci/run checks the base install on it
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        staged = Path(keep) / f".{out.name}.{os.getpid()}"  # pytest-xdist workers may both get here
        shutil.copy(out, staged)
        os.replace(staged, Path(keep) / out.name)
        shutil.copytree(phantom_data, Path(keep) / "images", dirs_exist_ok=True)
    return out, report


@pytest.fixture(scope="session")
def onnx_model(exported) -> Path:
    return exported[0]


@pytest.fixture(scope="session")
def trained_backbone(tmp_path_factory, trained_run) -> Path:
    """The trained run's (tiny) backbone as a local weights file: its features
    differ between images, unlike a random frozen backbone's."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from ctedge.training.model import backbone_of, load_model

    path = tmp_path_factory.mktemp("weights") / "tiny_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone_of(load_model(trained_run / "model.keras")))
    return path


@pytest.fixture(scope="session")
def tuned(tmp_path_factory, phantom_data, trained_run):
    """One cached-feature tuning project on the trained run's backbone (`--weights
    RUN`): (directory, summary)."""
    directory = tmp_path_factory.mktemp("tuning")
    result = runner.invoke(app, tune_args(phantom_data, directory, trained_run,
                                          "--json", str(directory / "out.json")))
    assert result.exit_code == 0, result.output
    return directory, json.loads((directory / "out.json").read_text())
