"""Inference engines behind ``ctedge.edge.runtime.Classifier``: a registry
(``registry``) with one module per engine (``onnxruntime``, ``openvino``), each an
optional install imported only when an engine is opened; runtime="auto" (``choice``);
the machine they run on (``machine``).

The CLI's engine choices are built here from the registry, so a new engine shows up
in ``--runtime``, ``--provider`` and ``--precision`` without another list.
"""

from __future__ import annotations

from ctedge.core.choices import Choice
from ctedge.edge.engines.choice import CHOICE_SUFFIX, choice_path, resolve, saved_choice
from ctedge.edge.engines.machine import cpu_name, isa_features, machine_key
from ctedge.edge.engines.registry import (
    Engine,
    EngineConfig,
    EngineSpec,
    all_devices,
    all_precisions,
    engine_names,
    get_engine,
    import_backend,
    installed,
    no_engine_message,
    open_engine,
    register_engine,
    require,
    variant_file,
    variant_path,
)

__all__ = ["CHOICE_SUFFIX", "BenchRuntime", "Engine", "EngineConfig", "EngineSpec", "Precision", "Provider",
           "Runtime", "all_devices", "all_precisions", "choice_path", "cpu_name", "engine_names", "get_engine",
           "import_backend", "installed", "isa_features", "machine_key", "no_engine_message", "open_engine",
           "register_engine", "require", "resolve", "saved_choice", "variant_file", "variant_path"]


def _choice(name: str, values: tuple[str, ...], doc: str) -> type[Choice]:
    choice = Choice(name, [(value, value) for value in values])
    choice.__doc__ = doc
    return choice


Runtime = _choice("Runtime", ("auto", *engine_names()),
                  "Inference engine; auto: the one `bench --runtime all` saved beside the model, else the "
                  "first installed engine that runs the file.")
BenchRuntime = _choice("BenchRuntime", (*Runtime.values(), "all"),
                       "Engine to benchmark; all: every engine × precision × device here.")
Precision = _choice("Precision", all_precisions(), "Numeric precision of inference.")
Provider = _choice("Provider", all_devices(), "Device; each engine takes its own (see its registry entry).")
