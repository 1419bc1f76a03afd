"""runtime="auto": the engine ``ctedge bench --runtime all`` saved beside the model for
this machine, else the first installed engine that runs the file, at fp32."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from ctedge.core.errors import CtedgeError
from ctedge.edge.engines import registry
from ctedge.edge.engines.machine import machine_key
from ctedge.edge.engines.registry import (
    HINTS,
    EngineConfig,
    all_precisions,
    engine_names,
    get_engine,
    no_engine_message,
    variant_stem,
)

log = logging.getLogger(__name__)

CHOICE_SUFFIX = ".runtime.json"  # written beside a model by `ctedge bench --runtime all`


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
    if runtime not in engine_names() or precision not in all_precisions() or not registry.installed(runtime):
        return None
    return choice


def validate(config: EngineConfig) -> None:
    """Names the parameter of a runtime, precision, device, thread count or hint that is not valid."""
    if config.runtime != "auto":
        get_engine(config.runtime)
    if config.precision is not None and config.precision not in all_precisions():
        raise CtedgeError(f"must be {', '.join(all_precisions())}, not {config.precision!r}", param="precision")
    if config.threads is not None and config.threads < 1:
        raise CtedgeError(f"must be at least 1, not {config.threads}", param="threads")
    if config.hint not in HINTS:
        raise CtedgeError(f"must be {' or '.join(HINTS)}, not {config.hint!r}", param="hint")


def _auto_runtime(model: Path, provider: str) -> str:
    """The first installed engine that runs the file on ``provider`` (else on any device:
    ``check_fits`` then names the devices it has)."""
    runs = [name for name in engine_names() if model.suffix in get_engine(name).accepts and registry.installed(name)]
    for name in runs:
        if provider == "auto" or provider in get_engine(name).devices:
            return name
    if runs:
        return runs[0]
    raise CtedgeError(no_engine_message())


def _choice_applies(choice: dict, precision: str | None, provider: str) -> bool:
    """A saved choice fills in what was left to auto; an explicit precision or device it
    was not measured with beats it."""
    return (precision is None or precision == choice["precision"]) and \
        provider in ("auto", choice.get("provider", "auto"))


def check_fits(config: EngineConfig, model: Path) -> None:
    """The engine takes this file, precision and device (before any backend is imported)."""
    spec = get_engine(config.runtime)
    if model.suffix not in spec.accepts:
        others = [n for n in engine_names() if model.suffix in get_engine(n).accepts]
        raise CtedgeError(f"{model}: {spec.name} runs {', '.join(spec.accepts)} files"
                          + (f"; use --runtime {others[0]}" if others else ""))
    if config.precision not in spec.precisions:
        others = [n for n in engine_names() if config.precision in get_engine(n).precisions]
        raise CtedgeError(f"{spec.name} has no {config.precision.upper()} inference precision for this model"
                          + (f": use --runtime {others[0]} --precision {config.precision}" if others else ""),
                          param="precision")
    if config.provider != "auto" and config.provider not in spec.devices:
        raise CtedgeError(f"for {spec.name} must be auto, {', '.join(spec.devices)}, not {config.provider!r}",
                          param="provider")


def resolve(model: Path, config: EngineConfig) -> EngineConfig:
    """Fill in runtime="auto" and precision=None: the saved bench choice (unless an explicit
    precision or device differs from it), else the first installed engine that runs the file
    on that device (onnxruntime; OpenVINO for an IR .xml or an Intel GPU/NPU) at fp32; an
    export variant file (``m_fp16.onnx``) at its own precision, another one asked for refused."""
    validate(config)
    runtime, precision, provider = config.runtime, config.precision, config.provider
    if runtime == "auto":
        choice = saved_choice(model)
        if choice and _choice_applies(choice, precision, provider):
            runtime, precision = choice["runtime"], choice["precision"]
            provider = choice.get("provider", "auto")
            log.info("runtime auto: %s %s (fastest in %s)", runtime, precision, choice_path(model).name)
        else:
            runtime = _auto_runtime(model, provider)
    registry.require(runtime)
    own = registry.file_precision(runtime, model)  # a variant file given itself runs as what it is
    if own and config.precision not in (None, own):
        raise CtedgeError(f"{config.precision}: {model.name} is the {own} file exported from "
                          f"{variant_stem(model)}.onnx; run that model for {config.precision}, or this file at {own}",
                          param="precision")
    resolved = replace(config, runtime=runtime, precision=own or precision or "fp32", provider=provider)
    check_fits(resolved, model)
    return resolved
