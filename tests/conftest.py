"""Session-wide fixtures, built once per test run and shared by every test file and
every pytest-xdist worker: phantom data, one trained run (tiny backbone), one ONNX
export with its variants, one tuning project. The first worker that needs one builds
it into the run's shared folder under a file lock (pytest-xdist's documented pattern);
the others wait for it and read it. No test trains, exports or tunes again what a
fixture already has, and no test changes a fixture's files. Every test makes its own
small images (no ../shared, no network)."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ctedge.cli import app  # noqa: E402
from ctedge.core.phantoms import make_dataset  # noqa: E402
from helpers import TRAIN_SIZE, brightness_onnx, tune_args  # noqa: E402
from slowest import order_for_workers  # noqa: E402

runner = CliRunner()
T = TypeVar("T")


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker more than the usable cores, at most 4 (``--maxprocesses``).
    Many tests mostly wait (a PACS peer, a node's retry, a Ray cluster starting); the extra
    worker runs beside them: on 2 cores 3 workers took 230-238 s against 252-255 s for 2."""
    from ctedge.edge.engines.machine import usable_cpus

    return usable_cpus() + 1


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (the project's --dist worksteal), the slowest tests first, spread
    over the workers (tests/slowest.py). Each worker collects, so each reorders alike."""
    items[:] = order_for_workers(items, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Wait for, then hold, an flock on ``path`` (every worker of the run sees the same file)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_folder(tmp_path_factory) -> Path:
    """The test run's own folder: under pytest-xdist every worker's basetemp sits in it."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory) -> Iterator[Path]:
    """Engine caches (compiled models, optimized graphs) in the run's folder, shared by its
    workers and subprocesses, not in the user's ~/.cache/ctedge (where each test model
    left a folder: 1.2 GB after a few hundred runs)."""
    folder = _run_folder(tmp_path_factory) / "engine-cache"
    folder.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTEDGE_CACHE_DIR", str(folder))
        yield folder


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """``load(folder)`` of a fixture that ``build(folder)`` makes once per test run: under
    pytest-xdist every worker's basetemp sits in the run's own folder, where the first
    worker builds it (under a lock; the others wait) and every worker reads it. A build
    that fails leaves nothing behind, so the next worker tries (and fails) again."""
    shared = _run_folder(tmp_path_factory) / "shared-fixtures"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with _locked(shared / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return load(folder)


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """The one ONNX stand-in for an exported model (helpers.brightness_onnx, 32 px, with
    ctedge metadata): TensorFlow-free, built in milliseconds. The trained tiny model's
    own export is ``exported``."""
    return brightness_onnx(tmp_path_factory.mktemp("stand-in") / "bright.onnx", size=32)


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory) -> Path:
    """A COVID-CT-like folder: CT_COVID/ and CT_NonCOVID/, 12 phantoms each, 64 px."""
    return built_once(tmp_path_factory, "phantoms", lambda folder: make_dataset(folder, per_class=12, size=64, seed=1),
                      lambda folder: folder)


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
    def build(root: Path) -> None:
        data = shutil.copytree(phantom_data, root / "data")
        (data / "CT_COVID" / "junk.png").write_text("not an image")
        result = runner.invoke(app, ["train", str(data), "--backbone", "tiny", "--weights", "none",
                                     "--image-size", str(TRAIN_SIZE), "--epochs", "2", "--batch-size", "4",
                                     "--units", "8", "--lr", "1e-3", "-o", str(root / "run"),
                                     "--json", str(root / "train.json")])
        assert result.exit_code == 0, result.output
        (root / "stderr.txt").write_text(result.stderr)

    return built_once(tmp_path_factory, "train", build, lambda root: Trained(
        root / "run", json.loads((root / "train.json").read_text()), (root / "stderr.txt").read_text()))


@pytest.fixture(scope="session")
def trained_run(trained) -> Path:
    return trained.run_dir


@pytest.fixture(scope="session")
def exported(tmp_path_factory, trained_run, phantom_data):
    """The trained run exported once, with FP16 and INT8 variants and OpenVINO IRs: (path, report)."""
    def build(root: Path) -> None:
        from ctedge.training.export import ExportOptions, export_onnx

        out = root / "tiny.onnx"
        report = export_onnx(trained_run / "model.keras", out, ExportOptions(
            fp16=True, int8=True, calibration_data=str(phantom_data), calibration_count=8,
            check_data=str(phantom_data), check_count=16, int8_tolerance=1.0, openvino=True,
            keep_flagged=True))
        (root / "report.pickle").write_bytes(pickle.dumps(report))
        keep = os.environ.get("CTEDGE_KEEP_TEST_EXPORT")  # .ci/run checks the base install on it
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(out, Path(keep) / out.name)
            shutil.copytree(phantom_data, Path(keep) / "images", dirs_exist_ok=True)

    return built_once(tmp_path_factory, "export", build,
                      lambda root: (root / "tiny.onnx", pickle.loads((root / "report.pickle").read_bytes())))


@pytest.fixture(scope="session")
def onnx_model(exported) -> Path:
    return exported[0]


@pytest.fixture(scope="session")
def trained_backbone(tmp_path_factory, trained_run) -> Path:
    """The trained run's (tiny) backbone as a local weights file: its features
    differ between images, unlike a random frozen backbone's."""
    def build(root: Path) -> None:
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        from ctedge.training.model import backbone_of, load_model

        with h5py.File(root / "tiny_notop.h5", "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, backbone_of(load_model(trained_run / "model.keras")))

    return built_once(tmp_path_factory, "backbone", build, lambda root: root / "tiny_notop.h5")


@pytest.fixture(scope="session")
def tuned(tmp_path_factory, phantom_data, trained_run):
    """One cached-feature tuning project on the trained run's backbone (`--weights
    RUN`): (directory, summary)."""
    def build(directory: Path) -> None:
        result = runner.invoke(app, tune_args(phantom_data, directory, trained_run,
                                              "--json", str(directory / "out.json")))
        assert result.exit_code == 0, result.output

    return built_once(tmp_path_factory, "tuning", build,
                      lambda directory: (directory, json.loads((directory / "out.json").read_text())))
