"""TensorFlow-free inference on an exported ctedge model.

Imports numpy and opencv (plus pydicom for DICOM files) and the inference
engine it is asked for — onnxruntime or OpenVINO, each imported only when used
(see ``ctedge.edge.engines``) — so other apps can embed it on an edge box:

    from ctedge.edge.runtime import Classifier
    clf = Classifier("exports/b3.onnx")                       # auto: fastest benched, else onnxruntime
    clf = Classifier("exports/b3.onnx", runtime="openvino", precision="bf16")
    for row in clf.predict_files(["scan.png", "slice.dcm"]):
        print(row.path, row.probability, row.label)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctedge.core.errors import CtedgeError, UnreadableImage
from ctedge.core.imageio import read_image
from ctedge.core.metadata import ModelMetadata
from ctedge.core.preprocess import to_model_input
from ctedge.edge.engines import PROVIDERS, EngineConfig, open_engine, resolve, resolve_providers, session_options

log = logging.getLogger(__name__)

__all__ = ["Classifier", "Prediction", "EngineConfig", "PROVIDERS", "resolve_providers",
           "session_options"]


@dataclass
class Prediction:
    path: str
    probability: float | None
    label: str | None
    error: str | None = None




class Classifier:
    """An exported ctedge model: decode, resize as in training, run, threshold.

    ``runtime``: auto | onnxruntime | openvino; ``precision``: fp32 | bf16 | fp16 |
    int8 (None: what ``runtime="auto"`` picked, else fp32); ``provider``: the
    engine's device (onnxruntime: auto | cpu | cuda | tensorrt; OpenVINO: auto |
    cpu | gpu | npu).
    """

    def __init__(self, path: str | Path, provider: str = "auto", threads: int | None = None, *,
                 runtime: str = "auto", precision: str | None = None, cache_dir: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise CtedgeError(f"model not found: {self.path}")
        self.config = resolve(self.path, EngineConfig(runtime=runtime, precision=precision, provider=provider,
                                                          threads=threads, cache_dir=cache_dir))
        self.engine = open_engine(self.path, self.config)
        checked = ModelMetadata.from_props(self.engine.raw_metadata, self.engine.path, self.engine.inputs)
        self.metadata, self.input_name, self.size = checked.raw, checked.input_name, checked.size
        self.window, self.classes, self.positive = checked.window, list(checked.classes), checked.positive
        self.threshold, self.contract, self.negative = checked.threshold, checked.contract, checked.negative

    @property
    def runtime(self) -> str:
        return self.config.runtime

    @property
    def precision(self) -> str:
        return self.config.precision

    @property
    def providers(self) -> list[str]:
        return self.engine.devices

    @property
    def session(self):
        """The onnxruntime session (onnxruntime only)."""
        return getattr(self.engine, "session", None)

    def load(self, path: str | Path) -> np.ndarray:
        """One file -> model input (size, size, 3) float32 0-255."""
        return to_model_input(read_image(path, self.window).gray, self.size, self.contract)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Batch of model inputs -> P(positive) per image."""
        return self.engine.run(np.ascontiguousarray(images, np.float32))

    def label(self, probability: float) -> str:
        return self.positive if probability >= self.threshold else self.negative

    def predict_files(self, paths: list[str | Path], batch_size: int = 8) -> list[Prediction]:
        """Predict files in batches; a file that can't be read gets an error row."""
        if batch_size < 1:
            raise CtedgeError(f"must be at least 1, not {batch_size}", param="batch_size")
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
                for path, p in zip(batch, map(float, self.predict_arrays(np.stack(images)))):
                    rows.append(Prediction(path, p, self.label(p)) if np.isfinite(p) else
                                Prediction(path, None, None, f"the model gave {p}, not a probability"))
        order = {str(p): i for i, p in enumerate(paths)}
        return sorted(rows, key=lambda row: order[row.path])

