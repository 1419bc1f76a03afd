"""TensorFlow-free inference on an exported ctedge ONNX model.

Imports numpy, opencv and onnxruntime only (plus pydicom for DICOM files), so
other apps can embed it on an edge box with the base install:

    from ctedge.runtime import Classifier
    clf = Classifier("exports/b3.onnx")
    for row in clf.predict_files(["scan.png", "slice.dcm"]):
        print(row.path, row.probability, row.label)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import CtedgeError, UnreadableImage
from .imageio import read_image
from .metadata import ModelMetadata
from .preprocess import to_model_input

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


@dataclass
class Prediction:
    path: str
    probability: float | None
    label: str | None
    error: str | None = None


def resolve_providers(provider: str) -> list[str]:
    """ORT provider list for auto|cpu|cuda|tensorrt, falling back with a message."""
    available = ort.get_available_providers()
    if provider == "auto":
        return [p for p in PROVIDERS.values() if p in available][::-1]
    if provider not in PROVIDERS:
        raise CtedgeError(f"--provider must be auto, cpu, cuda or tensorrt, not {provider!r}")
    wanted = PROVIDERS[provider]
    if wanted not in available:
        log.warning("%s is not available in this onnxruntime (%s); using the CPU. "
                    "For NVIDIA GPUs install ctedge[cuda].", wanted, ", ".join(available))
        return ["CPUExecutionProvider"]
    chain = [wanted, "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in dict.fromkeys(chain) if p in available]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


class Classifier:
    """An exported ctedge model: decode, resize as in training, run, threshold."""

    def __init__(self, path: str | Path, provider: str = "auto", threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise CtedgeError(f"model not found: {self.path}")
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                                providers=resolve_providers(provider))
        except Exception as exc:  # ORT raises its own types for a non-ONNX file
            raise CtedgeError(f"{self.path}: not a loadable ONNX model ({exc})") from None
        checked = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, self.path,
                                           {i.name: i.shape for i in self.session.get_inputs()})
        self.metadata, self.input_name, self.size = checked.raw, checked.input_name, checked.size
        self.window, self.classes, self.positive = checked.window, list(checked.classes), checked.positive
        self.threshold = checked.threshold

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def load(self, path: str | Path) -> np.ndarray:
        """One file -> model input (size, size, 3) float32 0-255."""
        return to_model_input(read_image(path, self.window).gray, self.size)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Batch of model inputs -> P(positive) per image."""
        return self.session.run(None, {self.input_name: np.asarray(images, np.float32)})[0][:, 0]

    def label(self, probability: float) -> str:
        negative = next(c for c in self.classes if c != self.positive)
        return self.positive if probability >= self.threshold else negative

    def predict_files(self, paths: list[str | Path], batch_size: int = 8) -> list[Prediction]:
        """Predict files in batches; a file that can't be read gets an error row."""
        rows: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            batch, images = [], []
            for path in paths[start:start + batch_size]:
                try:
                    images.append(self.load(path))
                    batch.append(str(path))
                except UnreadableImage as exc:
                    rows.append(Prediction(str(path), None, None, exc.reason))
            if images:
                for path, p in zip(batch, self.predict_arrays(np.stack(images))):
                    rows.append(Prediction(path, float(p), self.label(float(p))))
        order = {str(p): i for i, p in enumerate(paths)}
        return sorted(rows, key=lambda row: order[row.path])

