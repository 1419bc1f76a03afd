"""Every fixed vocabulary of ctedge, once: the library validates against these
and the CLI offers them as choices (listed in ``--help``, completed by the shell).

Members are strings (``Clean.drop == "drop"``), so library code and JSON files
keep working with plain strings. The engine choices (runtime, precision, device) are
built from the engine registry: ``ctedge.edge.engines``."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A str enum whose str(), format() and repr() are its value's (a message quotes what
    the user typed: 'gpu', not <Provider.gpu: 'gpu'>)."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Clean(Choice):
    """Images with coloured annotation marks."""

    drop = "drop"
    report = "report"
    off = "off"


class Split(Choice):
    """One part of the data."""

    train = "train"
    val = "val"
    test = "test"


class EvalSplit(Choice):
    """A part of the data, or all of it (evaluate, report)."""

    train = "train"
    val = "val"
    test = "test"
    all = "all"


class Backbone(Choice):
    b3 = "b3"  # EfficientNetB3, the paper's
    tiny = "tiny"  # a 1%-compute EfficientNet for tests and smoke runs


class Algorithm(Choice):
    """Keras Tuner search algorithm."""

    random = "random"
    bayesian = "bayesian"
    hyperband = "hyperband"


class Objective(Choice):
    val_auc = "val_auc"
    val_accuracy = "val_accuracy"
    val_loss = "val_loss"


class Role(Choice):
    """Keras Tuner's distributed engine."""

    chief = "chief"
    worker = "worker"


class Aggregate(Choice):
    """How slice probabilities become a study's."""

    topk = "topk"
    max = "max"
    mean = "mean"


class LogFormat(Choice):
    """`ctedge serve`'s log lines."""

    text = "text"  # one line a record: ISO time, level, logger, message
    json = "json"  # one JSON object a line, for log collectors
