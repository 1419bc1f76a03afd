"""OpenVINO behind the engine protocol: an .onnx file or ctedge's IR (.xml) compiled once
for one device and inference precision, called through a pool of infer requests (an
infer request may serve one call at a time, so threads each borrow one).

OpenVINO is imported inside the functions only (listing engines must not load it);
one ``Core`` per process, as OpenVINO recommends.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ctedge.core.errors import CtedgeError
from ctedge.core.files import atomic_write, remove_stale_temps, replace_synced, sync_folder, temp_name
from ctedge.edge.engines.registry import (
    EngineConfig,
    default_cache_dir,
    file_precision,
    model_cache,
    register_engine,
    variant_file,
    variant_path,
)

if TYPE_CHECKING:  # numpy only in annotations: registering this engine loads no numpy
    import numpy as np

log = logging.getLogger(__name__)

DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # INFERENCE_PRECISION_HINT per precision
CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}  # what the device must offer for that hint
POOL_SIZE = 4  # infer requests at most; made when first needed


_core: list = []  # the process's one Core, made by core()
_core_lock = threading.Lock()


def core():
    """The process's one OpenVINO Core, made under a lock together with OpenVINO's first
    numpy hand-off: that hand-off, made by two threads at once (their first ``infer``),
    deadlocks in OpenVINO's bindings (a static initialiser entered with the GIL held;
    7 of 20 processes hung with 8 threads' first calls at once)."""
    with _core_lock:
        if not _core:
            import numpy as np
            import openvino as ov

            ov.Tensor(np.zeros(1, np.float32)).data  # sets the numpy bridge up in this thread
            _core.append(ov.Core())
        return _core[0]


def capabilities(device: str = "CPU") -> list[str]:
    return list(core().get_property(device, "OPTIMIZATION_CAPABILITIES"))


def cached_metadata(cache: Path | None) -> dict[str, str] | None:
    """The model's metadata saved in its cache folder at its first start."""
    if cache is None:
        return None
    try:
        return json.loads((cache / "ctedge-metadata.json").read_text())
    except (OSError, ValueError):
        return None


def remember_metadata(cache: Path | None, metadata: dict[str, str]) -> None:
    if cache is not None:
        try:
            atomic_write(json.dumps(metadata).encode(), cache / "ctedge-metadata.json")
        except OSError:
            pass


def ov_metadata(model) -> dict[str, str]:
    """ctedge's metadata keys as strings: ONNX metadata_props land in OpenVINO's
    rt_info["framework"] (also when saved as IR)."""
    if not model.has_rt_info(["framework"]):
        return {}
    framework = model.get_rt_info(["framework"]).astype(dict)
    return {key: str(value.astype(str)) for key, value in framework.items()}


def check_device(device: str, precision: str) -> None:
    # only a non-CPU device is looked up: listing devices loads every plugin (slow)
    if device != "CPU" and device not in core().available_devices:
        raise CtedgeError(f"OpenVINO device {device} not found (available: "
                          f"{', '.join(core().available_devices)})", param="provider")
    capability = CAPABILITY.get(precision)
    if capability and capability not in capabilities(device):
        raise CtedgeError(f"{precision}: this {device} has no {capability} support in OpenVINO; use fp32",
                          param="precision")


class OpenVinoEngine:
    """One compiled model; each ``run`` borrows an idle infer request from the pool
    (made when first needed, at most ``POOL_SIZE``), so threads may share the engine.
    Compiled models are cached, so a second start skips compilation."""

    name = "openvino"

    def __init__(self, path: Path, config: EngineConfig):
        self.device = "cpu" if config.provider == "auto" else config.provider
        self.precision, ov_device, hint = config.precision, DEVICES[self.device], HINTS[config.precision]
        self.path = path
        if config.precision == "int8":
            self.path = variant_file(self.name, path, "int8")
        check_device(ov_device, config.precision)
        properties = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": config.hint.upper(),
                      **config.provider_options}
        if config.threads:
            properties["INFERENCE_NUM_THREADS"] = config.threads
        cache = model_cache(Path(config.cache_dir) if config.cache_dir else default_cache_dir("openvino"), self.path)
        if cache is not None:
            properties["CACHE_DIR"] = str(cache)
        try:
            self.raw_metadata = cached_metadata(cache)
            model = None
            if self.raw_metadata is None:  # first start: read the model for its metadata
                model = core().read_model(str(self.path))
                self.raw_metadata = ov_metadata(model)
                remember_metadata(cache, self.raw_metadata)
            self._compiled = compile_one_image(self.path, cache, ov_device, properties, model) \
                if self.device == "cpu" and config.hint == "throughput" else None
            self._one_image = self._compiled is not None  # a call of several images runs them one by one
            if self._compiled is None:  # from the path: with a warm cache OpenVINO loads the blob, never the model
                self._compiled = core().compile_model(str(self.path), ov_device, properties)
        except RuntimeError as exc:
            raise CtedgeError(f"{self.path}: OpenVINO cannot load it ({str(exc).splitlines()[0]})") from None
        self._options = {k: str(v) for k, v in properties.items() if k != "CACHE_DIR"}
        self._confirm(ov_device, hint)
        self.parallel = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) \
            if config.hint == "throughput" else 1
        self._idle: queue.Queue = queue.Queue()
        self._made, self._lock = 0, threading.Lock()
        self.inputs = {port.get_any_name(): [None if (i == 0 and self._one_image) or not d.is_static
                                             else d.get_length() for i, d in enumerate(port.get_partial_shape())]
                       for port in self._compiled.inputs}

    def _confirm(self, device: str, hint: str) -> None:
        """What OpenVINO compiled for must be the device and precision asked for."""
        reported = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        if reported != hint:
            raise CtedgeError(f"OpenVINO compiled {self.path.name} at {reported}, not the {hint} asked for",
                              param="precision")
        executing = [str(d) for d in self._compiled.get_property("EXECUTION_DEVICES")]
        if not any(d.split(".")[0] == device for d in executing):
            raise CtedgeError(f"OpenVINO runs {self.path.name} on {', '.join(executing)}, not the {device} asked for",
                              param="provider")

    @property
    def devices(self) -> list[str]:
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        return [f"OpenVINO {DEVICES[self.device]} {hint}"]

    @property
    def options(self) -> dict[str, str]:
        return dict(self._options)

    def _borrow(self):
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                if self._made < max(POOL_SIZE, self.parallel):
                    self._made += 1
                    return self._compiled.create_infer_request()
            return self._idle.get()  # every request busy: wait for one

    def run(self, images: np.ndarray) -> np.ndarray:
        request = self._borrow()
        try:
            if self._one_image and len(images) != 1:
                import numpy as np

                return np.array([request.infer({0: image[None]})[0][0, 0] for image in images], np.float32)
            return request.infer({0: images})[0][:, 0].copy()
        finally:
            self._idle.put(request)


ONE_IMAGE = "one-image.xml"  # in the model's cache folder: the model with a batch of one


def compile_one_image(path: Path, cache: Path | None, device: str, properties: dict, model=None):
    """The model compiled for one image per call (its dynamic batch fixed to 1), as the
    throughput hint calls it; None for a model whose batch is not dynamic, or that OpenVINO
    cannot reshape (compiled from its path as it is). OpenVINO's CPU plugin prepares every
    new input shape of a dynamic model at its first call (0.2 s for B3 at 300 px, each start,
    on a study's critical path); a static shape is prepared when compiling, while the headers
    are read. The outputs were the dynamic model's, bit for bit, on every slice of the studies
    measured. The reshaped model is kept as IR in the model's cache folder (``_keep``), so
    later starts compile from that path and load OpenVINO's cached blob; without a cache it is
    reshaped in memory at each start (as is, each start, a model whose batch is fixed)."""
    kept = cache / ONE_IMAGE if cache is not None else None
    if kept is not None and kept.is_file():
        try:
            return core().compile_model(str(kept), device, properties)
        except RuntimeError as exc:  # a damaged file, say: made again from the model
            log.warning("%s: not usable (%s); made again from %s", kept, str(exc).splitlines()[0], path.name)
    if model is None:
        model = core().read_model(str(path))
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() == 0 or shape[0].is_static:
        return None
    shape[0] = 1
    try:
        model.reshape({model.inputs[0]: shape})
        if kept is not None:
            try:
                _keep(model, kept)
                return core().compile_model(str(kept), device, properties)
            except OSError as exc:  # a cache that can't be written (a full disk, say): the model still loads
                log.warning("%s: not kept in the cache (%s)", kept, exc)
        return core().compile_model(model, device, properties)
    except RuntimeError as exc:  # a graph whose batch can't be fixed: its dynamic batch, as the latency hint has it
        log.warning("%s: not compiled for one image per call (%s)", path.name, str(exc).splitlines()[0])
        return None


def _keep(model, kept: Path) -> None:
    """``model`` saved as IR at ``kept``, its weights as read (no FP16 compression): temp
    files, synced, renamed ``.bin`` before ``.xml`` (the file looked for), the folder synced."""
    import openvino as ov

    remove_stale_temps(kept)
    partial = temp_name(kept, ".xml")
    try:
        ov.save_model(model, str(partial), compress_to_fp16=False)
        replace_synced(partial.with_suffix(".bin"), kept.with_suffix(".bin"))
        replace_synced(partial, kept)
        sync_folder(kept.parent)
    except RuntimeError as exc:  # OpenVINO's own write error
        raise OSError(str(exc).splitlines()[0]) from None
    finally:
        partial.unlink(missing_ok=True)
        partial.with_suffix(".bin").unlink(missing_ok=True)


def about() -> dict:
    import openvino as ov

    return {"version": ov.__version__.split("-")[0], "cpu_capabilities": capabilities("CPU")}


def variants(model: Path, devices: list[str]) -> list[tuple[str, str]]:
    """(precision, device) pairs on the CPU: fp32, bf16/fp16 where the CPU has them, the INT8 IR
    (that IR given itself: int8 only)."""
    own = file_precision("openvino", model)
    if own:
        return [(own, "cpu")]
    found = [("fp32", "cpu")] + [(p, "cpu") for p in ("bf16", "fp16") if CAPABILITY[p] in capabilities("CPU")]
    if variant_path("openvino", model, "int8").is_file():
        found.append(("int8", "cpu"))
    return found


@register_engine("openvino", package="openvino", extra='pip install "ctedge[openvino]"', accepts=(".onnx", ".xml"),
                 devices=("cpu", "gpu", "npu"), precisions=("fp32", "bf16", "fp16", "int8"),
                 files={"ir": ("_ov.xml", "--openvino"), "int8": ("_ov_int8.xml", "--openvino")},
                 thread_safe=True, about=about, variants=variants)
def open_openvino(path: Path, config: EngineConfig) -> OpenVinoEngine:
    return OpenVinoEngine(path, config)


# --- export's tooling: IR conversion and NNCF INT8 --------------------------------------

def read_model(path: Path):
    return core().read_model(str(path))


def set_metadata(model, metadata: dict) -> None:
    """ctedge's keys as JSON strings (Image.* as plain strings) in rt_info["framework"]."""
    for key, value in metadata.items():
        model.set_rt_info(value if key.startswith("Image.") else json.dumps(value), ["framework", key])


def save_ir(model, path: Path) -> Path:
    """IR .xml + .bin in float32 (no compression)."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def quantize_ir(ir_path: Path, calibration: np.ndarray, ignored_types: list[str]):
    """NNCF post-training INT8 of an IR on ``calibration`` images."""
    import nncf

    ignored = nncf.IgnoredScope(types=ignored_types) if ignored_types else None
    return nncf.quantize(read_model(ir_path), nncf.Dataset(list(calibration), lambda image: image[None]),
                         subset_size=len(calibration), **({"ignored_scope": ignored} if ignored else {}))

