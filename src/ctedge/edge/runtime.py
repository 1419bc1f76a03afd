"""TensorFlow-free inference on an exported ctedge model.

Imports numpy and opencv (plus pydicom for DICOM files) and the inference
engine it is asked for — onnxruntime or OpenVINO, each imported only when used
(see ``ctedge.edge.engines``) — so other apps can embed it on an edge box:

    from ctedge.edge.runtime import Classifier
    clf = Classifier("exports/b3.onnx")                       # auto: fastest benched, else onnxruntime
    clf = Classifier("exports/b3.onnx", runtime="openvino", precision="bf16")
    for row in clf.predict_files(["scan.png", "slice.dcm"]):
        print(row.path, row.probability, row.label)

A ``Classifier`` is immutable after construction and may be shared by threads
(``with_threshold`` gives a copy with another threshold on the same engine).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from concurrent.futures import Executor, Future
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ctedge.core.dicom import DEFAULT_MAX_PIXELS, check_budgets
from ctedge.core.errors import CtedgeError, UnreadableImage
from ctedge.core.imageio import read_image
from ctedge.core.metadata import ModelMetadata
from ctedge.core.preprocess import to_model_input
from ctedge.core.results import EngineInfo, ImagePrediction, ImagePredictions
from ctedge.edge.engines import EngineConfig, get_engine, import_backend, open_engine, resolve

log = logging.getLogger(__name__)

__all__ = ["Classifier", "Prediction", "EngineConfig", "load_in_background", "predict_images"]

Prediction = ImagePrediction  # the row type's earlier name
DEFAULT_FIXED_BATCH = 8


class Classifier:
    """An exported ctedge model: decode, resize as in training, run, threshold.

    ``runtime``: auto or a registered engine (onnxruntime, openvino); ``precision``:
    fp32 | bf16 | fp16 | int8 (None: what ``runtime="auto"`` picked, else fp32);
    ``provider``: the engine's one device (onnxruntime: auto | cpu | cuda | tensorrt;
    OpenVINO: auto | cpu | gpu | npu); ``provider_options``: backend options (KEY=VALUE).
    ``pad``: every call runs ``fixed_batch`` images, the last batch padded and the
    padding's outputs dropped, so the backend sees one input shape (None: on for a
    GPU, where it is also warmed up with that shape at start). ``max_pixels``: the
    pixel budget of every file this classifier reads (``ctedge --max-pixels``); a
    larger file gets an error row, refused from its header. ``hint``: latency (each
    call fastest) or throughput (most images per second from ``parallel`` calls at
    once, as a study's pipeline makes them).
    """

    def __init__(self, path: str | Path, provider: str = "auto", threads: int | None = None, *,
                 runtime: str = "auto", precision: str | None = None, cache_dir: str | None = None,
                 provider_options: dict[str, str] | None = None, pad: bool | None = None,
                 fixed_batch: int = DEFAULT_FIXED_BATCH, max_pixels: int = DEFAULT_MAX_PIXELS,
                 hint: str = "latency"):
        path = Path(path)
        if not path.is_file():
            raise CtedgeError(f"model not found: {path}")
        if fixed_batch < 1:
            raise CtedgeError(f"must be at least 1, not {fixed_batch}", param="fixed_batch")
        check_budgets(max_pixels=max_pixels)
        config = resolve(path, EngineConfig(runtime=runtime, precision=precision, provider=provider,
                                            threads=threads, cache_dir=cache_dir,
                                            provider_options=dict(provider_options or {}),
                                            fixed_batch=None if pad is False else fixed_batch, hint=hint))
        started = time.perf_counter()
        engine = open_engine(path, config)
        session_s = time.perf_counter() - started
        checked = ModelMetadata.from_props(engine.raw_metadata, engine.path, engine.inputs)
        padded = pad if pad is not None else engine.device != "cpu"
        fields = {"path": path, "config": config, "_engine": engine, "metadata": MappingProxyType(checked.raw),
                  "input_name": checked.input_name, "size": checked.size, "window": checked.window,
                  "classes": tuple(checked.classes), "positive": checked.positive, "negative": checked.negative,
                  "threshold": checked.threshold, "contract": checked.contract,
                  "fixed_batch": fixed_batch if padded else None, "max_pixels": max_pixels, "startup_s": {"session": session_s},
                  # an engine not registered thread_safe serves one call at a time
                  "_guard": contextlib.nullcontext() if get_engine(config.runtime).thread_safe else threading.Lock()}
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        if padded and engine.device != "cpu":  # the first call (cuDNN's search, TensorRT's build) paid here
            started = time.perf_counter()
            self.predict_arrays(np.zeros((fixed_batch, self.size, self.size, 3), np.float32))
            self.startup_s["warmup"] = time.perf_counter() - started

    def __setattr__(self, name, value):
        raise AttributeError(f"a Classifier is immutable (it may be shared by threads): {name} cannot be set; "
                             "use with_threshold() for another threshold")

    def with_threshold(self, threshold: float) -> Classifier:
        """The same model and engine with another decision threshold."""
        if not 0.0 < threshold < 1.0:
            raise CtedgeError(f"must be between 0 and 1, not {threshold}", param="threshold")
        other = copy.copy(self)
        object.__setattr__(other, "threshold", float(threshold))
        return other

    @property
    def runtime(self) -> str:
        return self.config.runtime

    @property
    def precision(self) -> str:
        return self.config.precision

    @property
    def device(self) -> str:
        return self._engine.device

    @property
    def parallel(self) -> int:
        """Calls at once that fill the device: more than 1 only under the throughput hint,
        on a thread-safe engine, without padding (a padded call is a whole fixed batch)."""
        if self.config.hint != "throughput" or self.fixed_batch or not isinstance(self._guard, contextlib.nullcontext):
            return 1
        return self._engine.parallel

    @property
    def providers(self) -> list[str]:
        return self._engine.devices

    @property
    def engine_info(self) -> EngineInfo:
        """The resolved engine, device, precision and file, for results."""
        source = self.metadata.get("source_model")
        return EngineInfo(runtime=self.runtime, device=self.device, providers=tuple(self.providers),
                          precision=self.precision, file=str(self._engine.path),
                          provider_options=self._engine.options, fixed_batch=self.fixed_batch,
                          source_sha256=source.get("sha256") if isinstance(source, dict) else None)

    def load(self, path: str | Path) -> np.ndarray:
        """One file -> model input (size, size, 3) float32 0-255."""
        return to_model_input(read_image(path, self.window, self.max_pixels).gray, self.size, self.contract)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Batch of model inputs -> P(positive) per image (in fixed batches when padding)."""
        images = np.ascontiguousarray(images, np.float32)
        if self.fixed_batch is None:
            return self._run(images)
        step, out = self.fixed_batch, []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            if len(chunk) < step:
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            out.append(self._run(chunk)[:len(images) - start])
        return np.concatenate(out) if out else np.empty(0, np.float32)

    def _run(self, images: np.ndarray) -> np.ndarray:
        with self._guard:
            return self._engine.run(images)

    def label(self, probability: float) -> str:
        return self.positive if probability >= self.threshold else self.negative

    def predict_files(self, paths: list[str | Path], batch_size: int = 8) -> list[ImagePrediction]:
        """Predict files in batches; a file that can't be read gets an error row."""
        if batch_size < 1:
            raise CtedgeError(f"must be at least 1, not {batch_size}", param="batch_size")
        rows: list[ImagePrediction] = []
        for start in range(0, len(paths), batch_size):
            batch, images = [], []
            for path in paths[start:start + batch_size]:
                try:
                    images.append(self.load(path))
                    batch.append(str(path))
                except UnreadableImage as exc:
                    rows.append(ImagePrediction(path=str(path), error=exc.reason))
            if images:
                for path, p in zip(batch, map(float, self.predict_arrays(np.stack(images)))):
                    rows.append(ImagePrediction(path=path, probability=p, label=self.label(p)) if np.isfinite(p) else
                                ImagePrediction(path=path, probability=None, label=None,
                                                error=f"the model gave {p}, not a probability"))
        order = {str(p): i for i, p in enumerate(paths)}
        return sorted(rows, key=lambda row: order[row.path])


def load_in_background(pool: Executor, path: str | Path, provider: str = "auto", threads: int | None = None,
                       **options) -> Future[Classifier]:
    """``Classifier(path, provider, threads, **options)`` built in ``pool`` while the caller
    goes on (reads a study's headers, say). The engine is resolved and its backend imported
    here first: an import is Python that holds the GIL throughout, and beside the caller's
    own Python work it slowed both (a 300-file header scan: 0.3 -> 0.7 s); the build itself
    (compiling the graph) releases the GIL and gets the resolved engine, so a saved bench
    choice is read (and logged) once. Options that do not resolve raise here; a model file
    that is not there, or another bad option, is named by the Classifier (through the future)."""
    if Path(path).is_file():
        resolved = resolve(Path(path), EngineConfig(runtime=options.get("runtime", "auto"),
                                                    precision=options.get("precision"), provider=provider,
                                                    threads=threads))
        import_backend(resolved.runtime)
        provider, options = resolved.provider, {**options, "runtime": resolved.runtime,
                                                "precision": resolved.precision}
    return pool.submit(Classifier, path, provider, threads, **options)


def predict_images(clf: Classifier, model: str | Path, paths: list[str | Path],
                   batch_size: int = 8) -> ImagePredictions:
    """`ctedge predict`'s document: one row per file, the engine used and a warning
    when the model's outputs are constant on these images."""
    from ctedge.core.metrics import constant_message, output_spread

    rows = clf.predict_files(paths, batch_size)
    scored = [r.probability for r in rows if r.error is None]
    constant = constant_message(output_spread(scored), len(scored)) if scored else None
    return ImagePredictions(model=str(model), engine=clf.engine_info, runtime=clf.runtime, precision=clf.precision,
                            provider=clf.providers[0], positive=clf.positive, threshold=clf.threshold,
                            predictions=tuple(rows), warnings=(constant,) if constant else ())
