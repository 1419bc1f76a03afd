"""The run configuration (``config.json``) that `train` and `tune` write beside a
model, read back by evaluate, export, report, explain and `tune --weights RUN`:
one typed, versioned record, with a clear error for a file that is not one."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Literal

from ctedge import __version__
from ctedge.core.data import DataOptions
from ctedge.core.errors import CtedgeError
from ctedge.core.preprocess import PreprocessConfig
from ctedge.core.results import save_json

SCHEMA_VERSION = 1  # 0: the unversioned files written before it (two shapes, train and tune)


@dataclass(kw_only=True)
class ModelConfig:
    """Backbone weights, head and which layers train."""

    weights: str = "imagenet"  # imagenet | none | path to efficientnetb3_notop.h5 | trained ctedge model
    backbone: str = "b3"  # b3 | tiny (tests and smoke runs only)
    units: int = 256
    dropout: float = 0.0
    pool_size: int = 4
    freeze_backbone: bool | None = None  # None: freeze pretrained weights, train random ones
    fine_tune_blocks: int = 0  # unfreeze the top N blocks (1-7) of the backbone

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings (paper: Adam 5e-5, batch 16, 100 epochs)."""

    epochs: int = 100
    batch_size: int = 16
    learning_rate: float = 5e-5
    early_stopping: bool = True
    patience: int = 10
    checkpoint_best: bool = True
    seed: int = 42


@dataclass(kw_only=True)
class TuneResult:
    """What a tuning search chose; the old unversioned files have only
    ``hyperparameters``."""

    hyperparameters: dict[str, float | int]
    best_score: float | None = None
    mode: str | None = None  # cached | fine-tune | naive
    algorithm: str | None = None
    objective: str | None = None
    epochs: int | None = None  # per trial
    batch_size: int | None = None


@dataclass(kw_only=True)
class RunConfig:
    """A training run (``train`` set) or a tuning project (``tune`` set)."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["train", "tune"]
    data: DataOptions
    model: ModelConfig
    preprocess: PreprocessConfig
    train: TrainConfig | None = None
    tune: TuneResult | None = None
    classes: list[str]  # [negative, positive] folder names
    positive: str | None = None
    splits: dict[str, dict] = field(default_factory=dict)  # per split: images, positive, negative, dropped...
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # per split: path -> sha256
    result: dict[str, float] = field(default_factory=dict)  # epochs_run, best_val_auc, seconds, images_per_s
    ctedge_version: str | None = __version__  # None: an old file that did not record it
    created: str | None = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))

    @property
    def learning_rate(self) -> float | None:
        if self.train is not None:
            return self.train.learning_rate
        return self.tune.hyperparameters.get("learning_rate") if self.tune else None

    @property
    def batch_size(self) -> int | None:
        return self.train.batch_size if self.train else (self.tune.batch_size if self.tune else None)

    def hyperparameters(self) -> dict:
        """The tuned values, or a trained run's head and learning rate."""
        if self.tune is not None:
            return dict(self.tune.hyperparameters)
        return {**self.model.to_dict(), "learning_rate": self.learning_rate}

    def to_dict(self) -> dict:
        raw = asdict(self)
        del raw["data"]["max_pixels"]  # the read budget of the machine reading, not a setting of the run
        return raw

    def save(self, path: str | Path) -> None:
        save_json(self.to_dict(), Path(path))  # an undefined score (NaN) as null

    @classmethod
    def load(cls, model_path: str | Path) -> RunConfig | None:
        """The ``config.json`` beside a model (or that file itself), or None when
        there is none. Unversioned files are read as version 0 and converted."""
        model_path = Path(model_path)
        path = model_path if model_path.name == "config.json" else model_path.parent / "config.json"
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise CtedgeError(f"{path}: not a readable run configuration ({exc})") from None
        foreign = (f"{path}: not a ctedge run configuration (written by `ctedge train` or `ctedge tune`); "
                   "move it away to use the model without it")
        if not isinstance(raw, dict):
            raise CtedgeError(foreign)
        version = raw.get("schema_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise CtedgeError(f"{path}: schema_version must be a whole number, not {version!r}")
        if version > SCHEMA_VERSION:
            raise CtedgeError(f"{path}: run configuration version {version} is newer than this ctedge "
                              f"({__version__}) reads (up to {SCHEMA_VERSION}); upgrade ctedge")
        if version == 0:
            if not (isinstance(raw.get("data"), dict) and isinstance(raw.get("model"), dict)):
                raise CtedgeError(foreign)
            raw = _from_version_0(raw)
        elif raw.get("kind") not in ("train", "tune"):
            raise CtedgeError(foreign)
        try:
            config = _build(raw)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CtedgeError(f"{path}: a run configuration with unknown or missing settings ({exc})") from None
        if not (isinstance(config.classes, list) and len(config.classes) == 2):
            raise CtedgeError(f"{path}: classes must be the two class folder names, not {config.classes!r}")
        return config


def _from_version_0(raw: dict) -> dict:
    """The two unversioned shapes: train's (a ``train`` section) and tune's
    (``hyperparameters`` merged into ``model``)."""
    raw = {"ctedge_version": None, "created": None, **raw}
    if "train" in raw or "hyperparameters" not in raw:
        return {**raw, "schema_version": SCHEMA_VERSION, "kind": "train"}
    model_fields = {f.name for f in fields(ModelConfig)}
    raw["model"] = {k: v for k, v in raw["model"].items() if k in model_fields}
    raw["tune"] = {"hyperparameters": raw.pop("hyperparameters")}
    return {**raw, "schema_version": SCHEMA_VERSION, "kind": "tune"}


def _build(raw: dict) -> RunConfig:
    parts = {"data": lambda d: DataOptions(**d), "model": lambda d: ModelConfig(**d),
             "preprocess": PreprocessConfig.from_dict,
             "train": lambda d: TrainConfig(**d), "tune": lambda d: TuneResult(**d)}
    values = {k: (parts[k](v) if k in parts and v is not None else v) for k, v in raw.items()}
    return RunConfig(**values)


def data_options_for(config: RunConfig | None, root: str | Path, **overrides) -> DataOptions:
    """The run's split settings (so 'val' means the same images), with the
    user's overrides on top."""
    stored = config.to_dict()["data"] if config else {}
    options = DataOptions(**{**stored, "root": str(root)})
    for key, value in overrides.items():
        if value is not None:
            setattr(options, key, value)
    return options


def keras_preprocess_config(model) -> PreprocessConfig:
    """Image size and window as built into a Keras classifier."""
    layer = model.get_layer("ct_preprocess")
    return PreprocessConfig(image_size=int(model.input_shape[1]), **{
        k: layer.get_config()[k] for k in ("window_low", "window_high", "centre")})
