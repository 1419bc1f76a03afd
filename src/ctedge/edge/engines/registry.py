"""The engine registry: one entry per inference engine, filed by ``register_engine``.

An entry says which extra installs the engine, which files it runs (the variant file
export writes per precision), its devices and precisions, and whether one opened
engine may be shared by threads. ``Classifier``, ``bench``, export's parity gate and
the CLI choices read it through the small functions below, never the raw dict.

Registering imports the engine's ctedge module only; the backend (onnxruntime,
OpenVINO) is imported inside the factory, so listing engines loads neither.
Adding an engine: one module with a ``@register_engine`` factory, one line in
``ENGINE_MODULES``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from ctedge.core.errors import CtedgeError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # numpy only in annotations: listing engines (the CLI's choices) loads no numpy
    import numpy as np

HINTS = ("latency", "throughput")  # what an engine is tuned for (OpenVINO's performance hints)

# the modules whose import registers an engine, in order of preference for runtime="auto"
ENGINE_MODULES = ("ctedge.edge.engines.onnxruntime", "ctedge.edge.engines.openvino")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How to run a model: engine, numeric precision, one device, threads, backend options."""

    runtime: str = "auto"  # auto or a registered engine name
    precision: str | None = None  # None: auto's choice, else fp32
    provider: str = "auto"  # a device of the engine, or auto: the engine's best device here
    threads: int | None = None
    cache_dir: str | None = None  # engine cache: OpenVINO blobs, ORT CPU graphs (default: default_cache_dir)
    provider_options: dict[str, str] = field(default_factory=dict)  # backend options (KEY=VALUE)
    fixed_batch: int | None = None  # every call has this batch size (the Classifier pads): one input shape
    hint: str = "latency"  # each call fastest, or throughput: most images/s from ``Engine.parallel`` calls at once


class Engine(Protocol):
    """An opened model on one device at one precision."""

    name: str
    path: Path  # the file it runs (a variant file for fp16/int8)
    precision: str
    device: str  # the device asked for and confirmed by the backend (cpu, cuda, tensorrt, gpu, ...)
    raw_metadata: dict[str, str]
    inputs: dict[str, list]  # input name -> shape, static dims as ints
    parallel: int  # calls at once that fill the device (1 under the latency hint)

    @property
    def devices(self) -> list[str]:
        """What the backend reports it runs on."""

    @property
    def options(self) -> dict[str, str]:
        """The backend options the session was given (recorded in results)."""

    def run(self, images: np.ndarray) -> np.ndarray:
        """float32 NHWC batch -> P(positive) per image."""


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """What the registry knows of one engine."""

    name: str
    factory: Callable[[Path, EngineConfig], Engine]
    package: str  # the backend's import name
    extra: str  # how to install it
    accepts: tuple[str, ...]  # model file suffixes it runs
    devices: tuple[str, ...]  # what --provider may name for it
    precisions: tuple[str, ...]
    files: dict[str, tuple[str, str]]  # precision (or "ir") -> (file name suffix, the export flag writing it)
    thread_safe: bool
    about: Callable[[], dict] = dict  # engine version and what this machine offers it (bench's report)
    variants: Callable[[Path, list[str]], list[tuple[str, str]]] = lambda model, devices: []  # (precision, device)


_ENGINES: dict[str, EngineSpec] = {}


def register_engine(name: str, *, package: str, extra: str, accepts: tuple[str, ...], devices: tuple[str, ...],
                    precisions: tuple[str, ...], files: dict[str, tuple[str, str]] | None = None,
                    thread_safe: bool, about: Callable[[], dict] = dict,
                    variants: Callable[[Path, list[str]], list[tuple[str, str]]] | None = None):
    """Decorator filing ``factory(path, config) -> Engine`` under ``name``."""
    def file(factory: Callable[[Path, EngineConfig], Engine]):
        _ENGINES[name] = EngineSpec(name=name, factory=factory, package=package, extra=extra, accepts=accepts,
                                    devices=devices, precisions=precisions, files=files or {},
                                    thread_safe=thread_safe, about=about,
                                    variants=variants or (lambda model, wanted: []))
        return factory
    return file


def _registered() -> dict[str, EngineSpec]:
    for module in ENGINE_MODULES:
        importlib.import_module(module)  # registers; imports no backend
    return _ENGINES


def engine_names() -> tuple[str, ...]:
    """Every registered engine, in order of preference."""
    return tuple(_registered())


def get_engine(name: str) -> EngineSpec:
    """The entry of ``name``; an unknown name lists the registered ones."""
    engines = _registered()
    if name not in engines:
        raise CtedgeError(f"must be auto, {', '.join(engines)}, not {name!r}", param="runtime")
    return engines[name]


def all_devices() -> tuple[str, ...]:
    """auto and every device any engine takes (the --provider choices)."""
    return tuple(dict.fromkeys(["auto", *(d for spec in _registered().values() for d in spec.devices)]))


def all_precisions() -> tuple[str, ...]:
    order = ("fp32", "bf16", "fp16", "int8")
    found = {p for spec in _registered().values() for p in spec.precisions}
    return tuple(p for p in order if p in found) + tuple(sorted(found - set(order)))


def installed(name: str) -> bool:
    """Whether the backend of engine ``name`` can be imported here (without importing it)."""
    return importlib.util.find_spec(get_engine(name).package) is not None


def import_backend(name: str) -> None:
    """Import engine ``name``'s backend package now, in the calling thread."""
    importlib.import_module(get_engine(name).package)


def no_engine_message() -> str:
    extras = [spec.extra for spec in _registered().values()]
    return "no inference engine is installed: install one with " + ", or ".join(extras)


def require(name: str) -> None:
    """One clear message naming the extra when an engine is missing."""
    if not installed(name):
        if not any(installed(other) for other in engine_names()):
            raise CtedgeError(no_engine_message())
        raise CtedgeError(f"{name} needs {get_engine(name).package}: {get_engine(name).extra}", param="runtime")


def variant_stem(model: Path) -> str:
    """The fp32 ONNX file's stem behind any variant file name (``m_fp16.onnx`` -> ``m``)."""
    name = model.name
    suffixes = sorted({s for spec in _registered().values() for s, _ in spec.files.values()}, key=len, reverse=True)
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return model.stem


def file_precision(name: str, model: Path) -> str | None:
    """The precision of ``model`` when it is one of engine ``name``'s variant files
    (``m_fp16.onnx``: fp16); None for any other file."""
    spec = get_engine(name)
    return next((precision for precision, (suffix, _) in spec.files.items()
                 if precision in spec.precisions and model.name.endswith(suffix)), None)


def variant_path(name: str, model: Path, precision: str) -> Path:
    """Where engine ``name``'s file for ``precision`` sits beside ``model`` (maybe absent)."""
    entry = get_engine(name).files.get(precision)
    if entry is None or model.name.endswith(entry[0]):
        return model
    return model.with_name(variant_stem(model) + entry[0])


def variant_file(name: str, model: Path, precision: str) -> Path:
    """The file engine ``name`` runs for ``precision``; a missing one names the export flag."""
    path = variant_path(name, model, precision)
    if not path.is_file():
        flag = get_engine(name).files[precision][1]
        raise CtedgeError(f"{precision}: {path} not found; it is written by `ctedge export` ({flag})",
                          param="precision")
    return path


def default_cache_dir(engine: str) -> Path:
    """Where an engine keeps what it builds once (compiled models, TensorRT engines) when
    no cache_dir is given: $CTEDGE_CACHE_DIR/ENGINE, else ~/.cache/ctedge/ENGINE (or under
    $XDG_CACHE_HOME)."""
    root = os.environ.get("CTEDGE_CACHE_DIR")
    if root:
        return Path(root) / engine
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ctedge" / engine


def model_cache(root: Path, path: Path) -> Path | None:
    """This model file's own folder in an engine's cache, keyed by its path, size and
    modification time (OpenVINO keys a model compiled from a path by the path alone, so a
    model re-exported under the same name would get the old compiled blob). Folders of
    earlier versions of the same path are removed; None (and a warning) when the cache
    can't be written."""
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
        log.warning("engine cache %s not usable (%s); starting without it", root, exc)
        return None
    return folder


def open_engine(model: Path, config: EngineConfig) -> Engine:
    """The engine of an already-resolved configuration (see ``resolve``)."""
    return get_engine(config.runtime).factory(model, config)
