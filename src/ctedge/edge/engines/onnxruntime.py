"""onnxruntime behind the engine protocol: one session on one provider (cpu, cuda,
tensorrt), with the provider options chosen here and recorded in results. On the CPU
the graph onnxruntime optimizes at start is kept in the engine cache, so a second
start loads it instead of optimizing again (B3: 0.26 -> 0.10 s, the same outputs);
under the throughput hint each call runs on one thread, as many calls at once as
threads (B3 on 2 cores: ~25% more slices per second than 2 threads per call).

onnxruntime is imported inside the functions only (listing engines must not load it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ctedge.core.errors import CtedgeError
from ctedge.core.files import remove_stale_temps, replace_synced, temp_name
from ctedge.edge.engines.machine import isa_features, machine_key, usable_cpus
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

CPU = "CPUExecutionProvider"
PROVIDERS = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_DEVICES = ("cuda", "tensorrt")
# CUDA provider options ctedge sets (a --provider-option of the same key wins). Where every call has
# one input shape (a fixed batch, warmed up at start), cuDNN's exhaustive search is paid once;
# where shapes vary it would be paid for each new shape, so the heuristic is used.
CUDA_DEFAULTS = {"do_copy_in_default_stream": "1", "arena_extend_strategy": "kSameAsRequested"}


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


def usable_devices() -> list[str]:
    """ctedge's names of the usable providers, best first (tensorrt, cuda, cpu)."""
    available = usable_providers()
    return [device for device in ("tensorrt", "cuda", "cpu") if PROVIDERS[device] in available]


def resolve_device(provider: str) -> str:
    """The one device to ask for: auto -> the best usable one; TensorRT listed but without
    libnvinfer -> CUDA with a message; a device this onnxruntime lacks -> an error."""
    devices = usable_devices()
    if provider == "auto":
        return devices[0]
    if provider == "tensorrt" and "tensorrt" not in devices and "cuda" in devices:
        log.warning("TensorRT's libraries (libnvinfer) are not installed; using CUDA. "
                    "Install TensorRT (e.g. pip install tensorrt) for --provider tensorrt.")
        return "cuda"
    if provider not in devices:
        import onnxruntime as ort

        raise CtedgeError(f"{PROVIDERS[provider]} is not available in this onnxruntime "
                          f"(it has {', '.join(ort.get_available_providers())}); "
                          "for NVIDIA GPUs install ctedge[cuda], or use --provider cpu", param="provider")
    return provider


def provider_options(device: str, precision: str, *, fixed_shape: bool, cache_dir: str | None = None,
                     extra: dict[str, str] | None = None) -> dict[str, str]:
    """The options the session's provider is given: ctedge's choices, then ``extra`` (wins)."""
    options: dict[str, str] = {}
    if device == "cuda":
        options = {**CUDA_DEFAULTS, "cudnn_conv_algo_search": "EXHAUSTIVE" if fixed_shape else "HEURISTIC"}
    elif device == "tensorrt":
        cache = str(Path(cache_dir) if cache_dir else default_cache_dir("tensorrt"))
        options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
                   "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
                   "trt_fp16_enable": "True" if precision == "fp16" else "False"}
    return {**options, **(extra or {})}


def session_providers(device: str, options: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """The provider list: the one device asked for (TensorRT beside CUDA for the nodes it
    leaves; the CPU provider is always there for what no GPU kernel covers)."""
    providers = [(PROVIDERS[device], options)]
    if device == "tensorrt":
        providers.append((PROVIDERS["cuda"], {k: v for k, v in CUDA_DEFAULTS.items()}))
    return providers


@functools.cache
def preload_gpu_libraries() -> None:
    """Once per process: CUDA/cuDNN from the nvidia-* pip packages (onnxruntime >= 1.21)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


def optimized_path(path: Path, cache_dir: str | None) -> Path | None:
    """Where this model's graph, as onnxruntime optimizes it for this CPU, is kept: the
    model's folder in the cache (its path, size and mtime), named by onnxruntime's version
    and the CPU (the saved graph holds CPU-specific layouts); None without a usable cache."""
    import onnxruntime as ort

    folder = model_cache(Path(cache_dir) if cache_dir else default_cache_dir("onnxruntime"), path)
    if folder is None:
        return None
    cpu = sorted(name for name, present in isa_features().items() if present)
    key = hashlib.sha256(f"{ort.__version__}|{machine_key()}|{cpu}".encode()).hexdigest()[:16]
    return folder / f"optimized-{key}.onnx"


def _optimized_session(path: Path, optimized: Path, threads: int | None, providers: list):
    """A CPU session from the kept optimized graph, or, the first time, from the model,
    keeping the graph it optimized (written to a temp file, synced, then renamed: never
    half a file; a killed first start's temp file goes at the next)."""
    import onnxruntime as ort

    if optimized.is_file():
        try:
            return ort.InferenceSession(str(optimized), session_options(threads), providers=providers,
                                        enable_fallback=0)
        except Exception as exc:  # a damaged file in the cache: optimize the model again
            log.warning("%s: unusable (%s); optimizing %s again", optimized, exc, path.name)
    remove_stale_temps(optimized)
    partial = temp_name(optimized, ".onnx")
    options = session_options(threads)
    options.optimized_model_filepath = str(partial)
    options.log_severity_level = 3  # its warning that the graph is for this machine: that is what the key says
    try:
        session = ort.InferenceSession(str(path), options, providers=providers, enable_fallback=0)
        replace_synced(partial, optimized)
        return session
    except Exception as exc:  # the model itself, or a cache that can't be written (a full disk, say)
        partial.unlink(missing_ok=True)
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers, enable_fallback=0)
        log.warning("%s: not kept in the cache (%s)", optimized, exc)  # the model loads: the cache failed
        return session


def ort_session(path: Path | bytes, device: str, options: dict[str, str], threads: int | None = None,
                cache_dir: str | None = None):
    """An InferenceSession on exactly ``device``: no fallback list (onnxruntime would print
    its retry to stdout), and the provider it reports must be the one asked for. A file on
    the CPU: its optimized graph kept in, and loaded from, the engine cache."""
    import onnxruntime as ort

    if device in GPU_DEVICES:
        preload_gpu_libraries()
    providers = session_providers(device, options)
    optimized = optimized_path(path, cache_dir) if device == "cpu" and isinstance(path, Path) else None
    if optimized is not None:
        session = _optimized_session(path, optimized, threads, providers)
    else:
        source = path if isinstance(path, bytes) else str(path)
        session = ort.InferenceSession(source, session_options(threads), providers=providers, enable_fallback=0)
    if session.get_providers()[0] != PROVIDERS[device]:
        raise CtedgeError(f"{PROVIDERS[device]} could not start (onnxruntime runs on "
                          f"{', '.join(session.get_providers())}); see onnxruntime's message above",
                          param="provider")
    return session


class OrtEngine:
    """An onnxruntime session; fp16/int8 run the variant files export wrote (TensorRT fp16:
    the fp32 file, built in fp16 by TensorRT). ``run`` is thread-safe (onnxruntime's guarantee)."""

    name = "onnxruntime"

    def __init__(self, path: Path, config: EngineConfig):
        self.device = resolve_device(config.provider)
        self.precision = config.precision
        tensorrt_fp16 = self.device == "tensorrt" and config.precision == "fp16"
        self.path = path if config.precision == "fp32" or tensorrt_fp16 else \
            variant_file(self.name, path, config.precision)
        self._options = provider_options(self.device, config.precision, fixed_shape=config.fixed_batch is not None,
                                         cache_dir=config.cache_dir, extra=config.provider_options)
        per_call = config.hint == "throughput" and self.device == "cpu"  # one thread per call, calls at once
        self.parallel = (config.threads or usable_cpus()) if per_call else 1
        self._session_options = {"intra_op_num_threads": "1"} if per_call else {}
        try:
            self._session = ort_session(self.path, self.device, self._options, 1 if per_call else config.threads,
                                        config.cache_dir)
        except CtedgeError:
            raise
        except Exception as exc:  # ORT raises its own types for a non-ONNX file or a bad option
            raise CtedgeError(f"{self.path}: not a loadable ONNX model on {self.device} ({exc})") from None
        self.raw_metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        self._input = self._session.get_inputs()[0].name
        self.inputs = {i.name: i.shape for i in self._session.get_inputs()}  # static dims as ints

    @property
    def devices(self) -> list[str]:
        return self._session.get_providers()

    @property
    def options(self) -> dict[str, str]:
        return {**self._options, **self._session_options}

    def run(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: images})[0][:, 0]


def about() -> dict:
    import onnxruntime as ort

    return {"version": ort.__version__, "available_providers": ort.get_available_providers()}


def variants(model: Path, devices: list[str]) -> list[tuple[str, str]]:
    """(precision, device) pairs this machine can run: fp32, and each variant file export wrote
    (a variant file given itself: its own precision only)."""
    usable = [d for d in usable_devices()[::-1] if d in devices]
    own = file_precision("onnxruntime", model)
    if own:
        return [(own, device) for device in usable]
    kept = [p for p in ("fp16", "int8") if variant_path("onnxruntime", model, p).is_file()]
    return [(p, device) for device in usable for p in ("fp32", *kept)]


@register_engine("onnxruntime", package="onnxruntime",
                 extra='pip install "ctedge[cpu]" (or "ctedge[cuda]" on NVIDIA GPUs)', accepts=(".onnx",),
                 devices=("cpu", "cuda", "tensorrt"), precisions=("fp32", "fp16", "int8"),
                 files={"fp16": ("_fp16.onnx", "--fp16"), "int8": ("_int8.onnx", "--int8")},
                 thread_safe=True, about=about, variants=variants)
def open_onnxruntime(path: Path, config: EngineConfig) -> OrtEngine:
    return OrtEngine(path, config)


# --- export's tooling: the parity gate runs the engine above; quantisation lives here --------

def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, *, input_name: str,
                  per_channel: bool, reduce_range: bool, op_types: list[str], qoperator: bool) -> None:
    """Static INT8 quantisation (pre-processed; QDQ or QOperator) on ``calibration`` images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.images = iter(calibration)

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {input_name: image[None]}

    prepared = out_path.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(out_path), Calibration(),
                        quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=op_types)
    finally:
        prepared.unlink(missing_ok=True)
