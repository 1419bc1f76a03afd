"""The ctedge metadata of an exported ONNX model, checked once when it is opened.

An ONNX file's ``metadata_props`` are input like any other: anyone can edit
them. ``ModelMetadata.from_props`` parses the ``ctedge.*`` keys and refuses
values that would crash later or, worse, silently mislabel every image (a NaN
threshold, a positive class that is not a class). numpy/json only, so every
runtime backend can use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctedge.core.errors import CtedgeError
from ctedge.core.preprocess import PREPROCESS_CONTRACT  # 1 when absent; a newer one than this is refused


def _invalid(path: Path, key: str, reason: str) -> CtedgeError:
    return CtedgeError(f"{path}: metadata ctedge.{key} is invalid: {reason}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class ModelMetadata:
    """The checked fields a runtime needs, plus every ctedge key as parsed (``raw``)."""

    classes: tuple[str, str]
    positive: str
    threshold: float
    input_name: str
    size: int
    window: tuple[float, float]
    contract: int
    raw: dict = field(default_factory=dict)

    @property
    def negative(self) -> str:
        return next(c for c in self.classes if c != self.positive)

    @classmethod
    def from_props(cls, props: Mapping[str, str], path: str | Path,
                   graph_inputs: Mapping[str, Sequence]) -> "ModelMetadata":
        """Parse and check ``metadata_props``; ``graph_inputs`` maps each graph input
        name to its shape (ints for static dims, anything else for dynamic ones)."""
        path = Path(path)
        if "ctedge.input" not in props:
            raise CtedgeError(f"{path}: ONNX model has no ctedge metadata (export it with "
                              "`ctedge export --onnx`)")
        raw = {}
        for key, text in props.items():
            if key.startswith("ctedge."):
                name = key.removeprefix("ctedge.")
                try:
                    raw[name] = json.loads(text)
                except ValueError as exc:
                    raise _invalid(path, name, f"not JSON ({exc})") from None
        for name in ("classes", "positive_class", "threshold", "preprocess"):
            if name not in raw:
                raise CtedgeError(f"{path}: metadata ctedge.{name} is missing")

        classes = raw["classes"]
        if not (isinstance(classes, list) and len(classes) == 2
                and all(isinstance(c, str) and c for c in classes) and classes[0] != classes[1]):
            raise _invalid(path, "classes", f"expected two distinct class names, got {classes!r}")
        positive = raw["positive_class"]
        if positive not in classes:
            raise _invalid(path, "positive_class", f"{positive!r} is not one of the classes {classes}")
        threshold = raw["threshold"]
        if not (_number(threshold) and 0 < threshold < 1):
            raise _invalid(path, "threshold", f"expected a finite number in (0, 1), got {threshold!r}")

        spec = raw["input"]
        if not isinstance(spec, dict):
            raise _invalid(path, "input", f"expected an object with name and size, got {spec!r}")
        name, size = spec.get("name"), spec.get("size")
        if name not in graph_inputs:
            raise _invalid(path, "input", f"name {name!r} is not an input of the graph "
                                          f"({', '.join(map(str, graph_inputs))})")
        if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
            raise _invalid(path, "input", f"size must be a positive integer, got {size!r}")
        shape = list(graph_inputs[name])
        if len(shape) != 4:
            raise _invalid(path, "input", f"graph input {name!r} has shape {shape}, not (batch, H, W, 3)")
        static = [d for d in shape[1:3] if isinstance(d, int) and d > 0]
        channels = shape[3]
        if any(d != size for d in static) or (isinstance(channels, int) and channels > 0 and channels != 3):
            raise _invalid(path, "input", f"size {size} does not match the graph input {name!r} "
                                          f"of shape {shape}")

        preprocess = raw["preprocess"]
        if not isinstance(preprocess, dict):
            raise _invalid(path, "preprocess", f"expected an object, got {preprocess!r}")
        low, high = preprocess.get("window_low"), preprocess.get("window_high")
        if not (_number(low) and _number(high) and low < high):
            raise _invalid(path, "preprocess", f"window_low < window_high (finite HU) expected, "
                                               f"got {low!r}, {high!r}")
        contract = preprocess.get("contract", 1)
        if not (isinstance(contract, int) and not isinstance(contract, bool)
                and 1 <= contract <= PREPROCESS_CONTRACT):
            raise _invalid(path, "preprocess", f"contract {contract!r} is not one this ctedge knows "
                                               f"(1-{PREPROCESS_CONTRACT}); upgrade ctedge")
        return cls(classes=(classes[0], classes[1]), positive=positive, threshold=float(threshold),
                   input_name=name, size=size, window=(float(low), float(high)),
                   contract=contract, raw=raw)
