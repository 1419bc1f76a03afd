"""Test helpers shared across files: small images, DICOM slices, a stand-in ONNX model."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import numpy as np

from ctedge.core.phantom_studies import write_slice

TRAIN_SIZE = 48  # input size of the session's trained run (conftest.trained)


def tune_args(data, directory, weights, *extra) -> list[str]:
    """`ctedge tune` on the tiny backbone, small enough for a test."""
    return ["tune", str(data), "--backbone", "tiny", "--weights", str(weights), "--image-size",
            str(TRAIN_SIZE), "--max-trials", "2", "--epochs", "2", "--views", "2",
            "--directory", str(directory), "--project", "p", *extra]


def gray_image(size: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def write_dicom(path, hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0,
                rescale: bool = True, **tags):
    """A single-frame CT slice holding ``hu`` (stored = (hu - intercept) / slope),
    written by the phantoms' own slice writer; ``tags`` add attributes."""
    stored = np.round((np.asarray(hu, float) - intercept) / slope)
    rescaling = {"RescaleSlope": slope, "RescaleIntercept": intercept} if rescale else {}
    return write_slice(Path(path), stored, {"Modality": "CT", **rescaling, **tags})


def brightness_onnx(path: Path, size: int = 32, centre: float = 60.0, gain: float = 0.1,
                    classes=("CT_COVID", "CT_NonCOVID"), positive: str = "CT_COVID",
                    threshold: float = 0.5, window=(-1000.0, 400.0), contract: int | None = None) -> Path:
    """A TensorFlow-free stand-in for an exported ctedge model, with its metadata:
    P(positive) = sigmoid(gain * (mean pixel - centre)), so brighter images (denser
    lungs) score higher. Builds in milliseconds; for runtime, study and CLI tests."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["mean", "centre"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    initializers = [
        helper.make_tensor("flat_shape", TensorProto.INT64, [2], [0, -1]),
        helper.make_tensor("centre", TensorProto.FLOAT, [], [centre]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [gain]),
    ]
    graph = helper.make_graph(
        nodes, "brightness",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    metadata = {
        "ctedge.variant": "fp32",
        "ctedge.classes": list(classes),
        "ctedge.positive_class": positive,
        "ctedge.threshold": threshold,
        "ctedge.input": {"name": "image", "layout": "NHWC", "dtype": "float32", "size": size,
                         "channels": 3, "pixel_range": [0, 255]},
        "ctedge.output": {"name": "probability", "shape": ["batch", 1]},
        "ctedge.preprocess": {"image_size": size, "window_low": window[0], "window_high": window[1],
                              "centre": 0.25, **({"contract": contract} if contract else {})},
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return Path(path)


def write_archive(folder: Path, count: int, zipped: int = 0, size: int = 48, slices: int = 12) -> list[Path]:
    """``count`` phantom studies (alternately positive), patients P0..P{count-1}: study
    folders, the last ``zipped`` of them as .zip files instead; their paths."""
    import shutil
    import zipfile

    from ctedge.core.phantom_studies import write_study

    rng = np.random.default_rng(count)
    paths = []
    for i in range(count):
        study = folder / f"p{i}"
        write_study(study, rng, positive=i % 2 == 0, slices=slices, size=size, patient_id=f"P{i}")
        if i >= count - zipped:
            with zipfile.ZipFile(study.with_suffix(".zip"), "w") as archive:
                for file in sorted(study.iterdir()):
                    archive.write(file, file.name)
            shutil.rmtree(study)
            study = study.with_suffix(".zip")
        paths.append(study)
    return paths


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range (32768 and up on Linux): a
    port the kernel handed out by ``bind(0)`` may be taken by any outgoing connection (an HTTP
    upload to Orthanc, say) before the test listens on it. Each xdist worker draws from its own
    band so that two workers never pick the same port."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 20000 + (worker % 8) * 1500
    for port in random.sample(range(low, low + 1500), 1500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free loopback port in {low}-{low + 1499}")
