"""Inference engines behind ``ctedge.edge.runtime.Classifier``: onnxruntime and OpenVINO.

Each engine is an optional install (``ctedge[cpu]``, ``ctedge[cuda]``,
``ctedge[openvino]``) and is imported only when it is used. An engine turns a
float32 NHWC batch into P(positive) per image and exposes the model's raw
ctedge metadata; decoding, resizing and thresholding stay in ``runtime``.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctedge.core.choices import Precision, Runtime
from ctedge.core.errors import CtedgeError
from ctedge.core.files import atomic_write

log = logging.getLogger(__name__)

RUNTIMES = Runtime.values()
PRECISIONS = Precision.values()
CPU = "CPUExecutionProvider"
PROVIDERS = {"cpu": CPU, "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
INSTALL = {"onnxruntime": 'pip install "ctedge[cpu]" (or "ctedge[cuda]" on NVIDIA GPUs)',
           "openvino": 'pip install "ctedge[openvino]"'}
# OpenVINO names of ctedge's precisions (its INFERENCE_PRECISION_HINT values)
OV_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
OV_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
CHOICE_SUFFIX = ".runtime.json"  # written beside a model by `ctedge bench --runtime all`


@dataclass(kw_only=True)
class EngineConfig:
    """How to run a model: engine, numeric precision, device and threads."""

    runtime: str = "auto"  # auto | onnxruntime | openvino
    precision: str | None = None  # fp32 | bf16 | fp16 | int8; None: auto's choice, else fp32
    provider: str = "auto"  # onnxruntime: auto | cpu | cuda | tensorrt; openvino: auto | cpu | gpu | npu
    threads: int | None = None
    cache_dir: str | None = None  # OpenVINO compiled-model cache (default: ~/.cache/ctedge/openvino)

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise CtedgeError(f"must be {', '.join(RUNTIMES)}, not {self.runtime!r}", param="runtime")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise CtedgeError(f"must be {', '.join(PRECISIONS)}, not {self.precision!r}", param="precision")
        if self.threads is not None and self.threads < 1:
            raise CtedgeError(f"must be at least 1, not {self.threads}", param="threads")


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(runtime) is not None


def no_engine_message() -> str:
    return ("no inference engine is installed: install one with " + INSTALL["onnxruntime"]
            + ", or " + INSTALL["openvino"])


def require(runtime: str) -> None:
    """One clear message naming the extra when an engine is missing."""
    if not installed(runtime):
        if not any(installed(name) for name in ("onnxruntime", "openvino")):
            raise CtedgeError(no_engine_message())
        raise CtedgeError(f"{runtime} needs {runtime}: {INSTALL[runtime]}", param="runtime")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_features() -> dict[str, bool]:
    """The CPU features that decide which precision is fast (Linux /proc/cpuinfo)."""
    flags = cpu_flags()
    return {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags,
            "VNNI": bool({"avx512_vnni", "avx_vnni"} & flags),
            "BF16": bool({"avx512_bf16", "amx_bf16"} & flags),
            "AVX512-FP16": "avx512_fp16" in flags,
            "AMX": bool({"amx_tile", "amx_bf16", "amx_int8"} & flags)}


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform says."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What a saved runtime choice is valid for: CPU model and core count."""
    return f"{cpu_name()} x{os.cpu_count()}"


def choice_path(model: Path) -> Path:
    return model.with_name(model.name + CHOICE_SUFFIX)


def saved_choice(model: Path) -> dict | None:
    """The fastest variant `ctedge bench --runtime all` found for this model on
    this machine, if that result sits beside the model and its engine is here."""
    path = choice_path(model)
    if not path.is_file():
        return None
    try:
        choice = json.loads(path.read_text())
        runtime, precision = choice["runtime"], choice["precision"]
    except (ValueError, KeyError, TypeError):
        log.warning("%s: not a ctedge runtime choice; ignored", path)
        return None
    if choice.get("machine") != machine_key():
        log.info("%s was measured on %s, not this machine; ignored", path, choice.get("machine"))
        return None
    if runtime not in RUNTIMES[1:] or precision not in PRECISIONS or not installed(runtime):
        return None
    return choice


def resolve(model: Path, config: EngineConfig) -> EngineConfig:
    """Fill in runtime="auto" and precision=None: the saved bench choice, else
    onnxruntime (OpenVINO for an IR .xml, or when onnxruntime is not installed) at fp32."""
    config.validate()
    runtime, precision, provider = config.runtime, config.precision, config.provider
    if runtime == "auto":
        choice = saved_choice(model)
        if choice and (precision is None or precision == choice["precision"]):
            runtime, precision = choice["runtime"], choice["precision"]
            if provider == "auto":
                provider = choice.get("provider", "auto")
            log.info("runtime auto: %s %s (fastest in %s)", runtime, precision, choice_path(model).name)
        elif installed("onnxruntime") and model.suffix != ".xml":  # IR: OpenVINO's own format
            runtime = "onnxruntime"
        elif installed("openvino"):
            runtime = "openvino"
        else:
            raise CtedgeError(no_engine_message())
    require(runtime)
    return EngineConfig(runtime=runtime, precision=precision or "fp32", provider=provider, threads=config.threads,
                        cache_dir=config.cache_dir)


def variant_file(path: Path, precision: str, suffixes: dict[str, str]) -> Path:
    """The file of a quantised variant export wrote beside the fp32 model."""
    suffix = suffixes[precision]
    if path.stem.endswith(suffix):
        return path
    candidate = path.with_name(path.stem + suffix + path.suffix)
    if not candidate.is_file():
        raise CtedgeError(f"{precision}: {candidate} not found; it is written by "
                          f"`ctedge export` ({'--openvino' if path.suffix == '.xml' else '--' + precision})", param="precision")
    return candidate


# --- onnxruntime ---------------------------------------------------------------

def tensorrt_loadable() -> bool:
    """onnxruntime-gpu lists TensorRT as available whether or not libnvinfer is installed."""
    return ctypes.util.find_library("nvinfer") is not None or any(
        _loads(f"libnvinfer.so.{major}") for major in (10, 11))


def _loads(library: str) -> bool:
    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def usable_providers() -> list[str]:
    """onnxruntime's available providers, less TensorRT when its libraries are missing."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if PROVIDERS["tensorrt"] in available and not tensorrt_loadable():
        return [p for p in available if p != PROVIDERS["tensorrt"]]
    return available


def resolve_providers(provider: str) -> list[str]:
    """ORT provider list for auto|cpu|cuda|tensorrt, falling back with a message."""
    available = usable_providers()
    if provider == "tensorrt" and PROVIDERS["tensorrt"] not in available and PROVIDERS["cuda"] in available:
        log.warning("TensorRT's libraries (libnvinfer) are not installed; using CUDA. "
                    "Install TensorRT (e.g. pip install tensorrt) for --provider tensorrt.")
    if provider == "auto":
        return [p for p in PROVIDERS.values() if p in available][::-1]
    if provider not in PROVIDERS:
        raise CtedgeError(f"for onnxruntime must be auto, cpu, cuda or tensorrt, not {provider!r}", param="provider")
    wanted = PROVIDERS[provider]
    chain = [wanted, PROVIDERS["cuda"], CPU]
    chain = [p for p in dict.fromkeys(chain) if p in available]
    if wanted not in available and chain[0] == CPU:
        log.warning("%s is not available in this onnxruntime (%s); using the CPU. "
                    "For NVIDIA GPUs install ctedge[cuda].", wanted, ", ".join(available))
    return chain


@functools.cache
def preload_gpu_libraries() -> None:
    """Once per process: CUDA/cuDNN from the nvidia-* pip packages (onnxruntime >= 1.21)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def ort_session(ort, path: Path, options, providers: list[str]):
    """An InferenceSession on a provider chain. For a GPU, CUDA/cuDNN from the nvidia-*
    pip packages are preloaded (onnxruntime-gpu does not find them otherwise), and
    onnxruntime's own fallback notices go to stderr, not into a --json stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        if providers[0] != CPU:
            preload_gpu_libraries()
        session = ort.InferenceSession(str(path), options, providers=providers)
    if providers[0] not in session.get_providers():
        log.warning("%s could not start (see onnxruntime's message above); running on %s",
                    providers[0], ", ".join(session.get_providers()))
    return session


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


class OrtEngine:
    """onnxruntime InferenceSession; fp16/int8 run the variant files export wrote."""

    name = "onnxruntime"

    def __init__(self, path: Path, config: EngineConfig):
        import onnxruntime as ort

        if config.precision == "bf16":
            raise CtedgeError("onnxruntime has no BF16 inference precision for this model: "
                              "use --runtime openvino --precision bf16")
        if path.suffix != ".onnx":
            raise CtedgeError(f"{path}: onnxruntime runs .onnx files; use --runtime openvino for IR (.xml)")
        self.path = variant_file(path, config.precision, {"fp32": "", "fp16": "_fp16", "int8": "_int8"}) \
            if config.precision != "fp32" else path
        self.precision = config.precision
        try:
            providers = resolve_providers(config.provider)
            self.session = ort_session(ort, self.path, session_options(config.threads), providers)
        except CtedgeError:
            raise
        except Exception as exc:  # ORT raises its own types for a non-ONNX file
            raise CtedgeError(f"{self.path}: not a loadable ONNX model ({exc})") from None
        self.raw_metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        self.inputs = {i.name: i.shape for i in self.session.get_inputs()}  # static dims as ints

    @property
    def devices(self) -> list[str]:
        return self.session.get_providers()

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0][:, 0]


# --- OpenVINO ------------------------------------------------------------------

def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ctedge" / "openvino"


def ov_capabilities(device: str = "CPU") -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES"))


class OpenVinoEngine:
    """OpenVINO on an .onnx file or ctedge's IR (.xml); precision is OpenVINO's
    inference precision (fp32, bf16, fp16) or the INT8 IR `export --openvino` wrote.
    Compiled models are cached, so a second start skips compilation."""

    name = "openvino"

    def __init__(self, path: Path, config: EngineConfig):
        import openvino as ov

        device = {"auto": "CPU", "cpu": "CPU", "gpu": "GPU", "npu": "NPU"}.get(config.provider.lower())
        if device is None:
            raise CtedgeError(f"for openvino must be auto, cpu, gpu or npu, not {config.provider!r}", param="provider")
        if path.suffix not in (".onnx", ".xml"):
            raise CtedgeError(f"{path}: OpenVINO runs .onnx files and IR (.xml) files")
        self.path, self.precision = path, config.precision
        hint = "f32"
        if config.precision == "int8":
            if path.suffix != ".xml":
                path = path.with_name(path.stem + "_ov.xml")
            self.path = variant_file(path, "int8", {"int8": "_int8"})
        elif config.precision in OV_HINTS:
            hint = OV_HINTS[config.precision]
        core = ov.Core()
        # only a non-CPU device is looked up: listing devices loads every plugin (slow)
        if device != "CPU" and device not in core.available_devices:
            raise CtedgeError(f"OpenVINO device {device} not found (available: "
                              f"{', '.join(core.available_devices)})")
        capability = OV_CAPABILITY.get(config.precision)
        if capability and capability not in core.get_property(device, "OPTIMIZATION_CAPABILITIES"):
            raise CtedgeError(f"{config.precision}: this {device} has no {capability} support "
                              "in OpenVINO; use fp32", param="precision")
        properties = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if config.threads:
            properties["INFERENCE_NUM_THREADS"] = config.threads
        cache = model_cache(Path(config.cache_dir) if config.cache_dir else default_cache_dir(), self.path)
        if cache is not None:
            core.set_property({"CACHE_DIR": str(cache)})
        try:
            self.raw_metadata = cached_metadata(cache)
            if self.raw_metadata is None:  # first start: read the model for its metadata
                self.raw_metadata = ov_metadata(core.read_model(str(self.path)))
                remember_metadata(cache, self.raw_metadata)
            # compiled from the path: with a warm cache OpenVINO loads the blob and never parses the model
            self.compiled = core.compile_model(str(self.path), device, properties)
        except RuntimeError as exc:
            raise CtedgeError(f"{self.path}: OpenVINO cannot load it ({str(exc).splitlines()[0]})") from None
        self.request = self.compiled.create_infer_request()
        self.device = device
        self.inputs = {port.get_any_name(): [d.get_length() if d.is_static else None
                                             for d in port.get_partial_shape()]
                       for port in self.compiled.inputs}

    @property
    def devices(self) -> list[str]:
        return [f"OpenVINO {self.device} {self.compiled.get_property('INFERENCE_PRECISION_HINT').to_string()}"]

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.request.infer({0: images})[0][:, 0].copy()


def model_cache(root: Path, path: Path) -> Path | None:
    """This model file's own cache folder, keyed by its path, size and modification
    time: OpenVINO keys a model compiled from a path by the path alone, so a model
    re-exported under the same name would get the old compiled blob. Folders of
    earlier versions of the same path are removed."""
    import hashlib
    import shutil

    stat = path.stat()
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    version = hashlib.sha256(f"{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = root / f"{where}-{version}"
    try:
        if not folder.is_dir():
            for old in root.glob(f"{where}-*"):
                shutil.rmtree(old, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("OpenVINO cache %s not usable (%s); compiling without a cache", root, exc)
        return None
    return folder


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


def open_engine(path: Path, config: EngineConfig):
    """The engine for an already-resolved configuration."""
    if config.runtime == "onnxruntime":
        return OrtEngine(path, config)
    return OpenVinoEngine(path, config)
