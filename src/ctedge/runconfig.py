"""The run configuration (``config.json``) that `train` and `tune` write beside a
model, read back by evaluate, export, report and explain, with a clear error
for a file that is not one."""

from __future__ import annotations

import json
from pathlib import Path

from .data import DataOptions
from .errors import CtedgeError
from .preprocess import PreprocessConfig


def run_config(model_path: str | Path) -> dict:
    """The ``config.json`` beside a trained model, or {} when there is none."""
    path = Path(model_path).parent / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise CtedgeError(f"{path}: not a readable run configuration ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("data", {}), dict) \
            or not isinstance(config.get("model", {}), dict):
        raise CtedgeError(f"{path}: not a ctedge run configuration (written by `ctedge train` or "
                          "`ctedge tune`); move it away to use the model without it")
    return config


def data_options_for(model_path: Path, root: str | Path, **overrides) -> DataOptions:
    """The training run's split settings (so 'val' means the same images),
    with the user's overrides on top."""
    stored = run_config(model_path).get("data", {})
    try:
        options = DataOptions(**{**stored, "root": str(root)})
    except TypeError as exc:
        raise CtedgeError(f"{Path(model_path).parent / 'config.json'}: unknown split settings ({exc})") from None
    for key, value in overrides.items():
        if value is not None:
            setattr(options, key, value)
    return options


def keras_preprocess_config(model) -> PreprocessConfig:
    """Image size and window as built into a Keras classifier."""
    layer = model.get_layer("ct_preprocess")
    return PreprocessConfig(image_size=int(model.input_shape[1]), **{
        k: layer.get_config()[k] for k in ("window_low", "window_high", "centre")})
