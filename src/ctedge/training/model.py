"""EfficientNetB3 with the paper's head, preprocessing inside the graph.

    raw image (N, S, S, 3) float32 0-255
      -> CTPreprocess (gray -> HU -> window -> zero-centre -> backbone range)
      -> EfficientNetB3 (no top; its own Rescaling + ImageNet Normalization)
      -> AveragePooling2D 4x4 -> Flatten -> Dense(units, ReLU) [-> Dropout]
      -> Dense(1, sigmoid)
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import keras
from keras import layers, ops

from ctedge.core.choices import Backbone
from ctedge.core.errors import CtedgeError
from ctedge.core.files import file_digest
from ctedge.core.imageio import DEFAULT_WINDOW
from ctedge.core.preprocess import PreprocessConfig, model_pixels
from ctedge.core.runconfig import ModelConfig, RunConfig

WEIGHTS_FILE = "efficientnetb3_notop.h5"
MIN_IMAGE_SIZE = 32  # EfficientNet's smallest input
BLOCKS = 7  # EfficientNet's blocks, the most fine_tune_blocks can unfreeze
BACKBONES = Backbone.values()
# Keras's own EfficientNet builder at width 0.1 / depth 0.1: every stage keeps one
# block, so layer names (stem_conv, block1a..block7a, top_conv) and every code path
# are B3's, at about 1% of its compute. For tests and smoke runs, not for diagnosis.
TINY = {"width_coefficient": 0.1, "depth_coefficient": 0.1, "default_size": 224,
        "dropout_rate": 0.2, "name": "efficientnet_tiny"}


@keras.saving.register_keras_serializable(package="ctedge")
class CTPreprocess(layers.Layer):
    """The paper's HU window and zero-centre, as a layer (see ``preprocess``)."""

    def __init__(self, window_low: float = DEFAULT_WINDOW[0], window_high: float = DEFAULT_WINDOW[1],
                 centre: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        self.config_ = PreprocessConfig(window_low=window_low, window_high=window_high,
                                        centre=centre)

    def call(self, inputs):
        return model_pixels(inputs, self.config_, clip=ops.clip)

    def get_config(self) -> dict:
        return {**super().get_config(), "window_low": self.config_.window_low,
                "window_high": self.config_.window_high, "centre": self.config_.centre}


def is_pretrained(weights: str | None) -> bool:
    return weights not in (None, "none", "None")


def build_backbone(weights: str, image_size: int, backbone: str = "b3") -> keras.Model:
    """EfficientNetB3 (or the tiny test backbone) without top. ``imagenet``
    downloads through Keras; a local B3 file is loaded into the model Keras
    builds for ``imagenet`` (which has an extra rescaling step that
    ``weights=None`` lacks), so both see the same preprocessing."""
    from keras.src.applications import efficientnet

    if backbone not in BACKBONES:
        raise CtedgeError(f"must be one of {', '.join(BACKBONES)}, not {backbone!r}", param="backbone")
    shape = (image_size, image_size, 3)
    run = run_model_path(weights)
    if run is not None:
        return _run_backbone(run, shape, backbone)
    if backbone == "tiny":
        return _build_tiny(weights, shape)
    if not is_pretrained(weights):
        return _scratch_momentum(efficientnet.EfficientNetB3(include_top=False, weights=None,
                                                             input_shape=shape))
    if weights == "imagenet":
        try:
            return efficientnet.EfficientNetB3(include_top=False, weights="imagenet",
                                               input_shape=shape)
        except Exception as exc:  # urllib/HTTP/OS errors, whichever Keras raised
            raise CtedgeError(
                f"could not download the ImageNet weights through Keras ({exc.__class__.__name__}: "
                f"{exc}). Without a network, fetch {efficientnet.BASE_WEIGHTS_PATH}{WEIGHTS_FILE} "
                f"elsewhere and pass --weights /path/to/{WEIGHTS_FILE}") from None
    path = _weights_file(weights)
    expected = efficientnet.WEIGHTS_HASHES["b3"][1]
    if file_digest(path, "md5") != expected:
        import logging
        logging.getLogger(__name__).warning(
            "%s is not Keras's official %s (md5 differs); loading it anyway", path, WEIGHTS_FILE)
    backbone = _imagenet_layout(efficientnet.EfficientNetB3(include_top=False, weights=None,
                                                            input_shape=shape))
    try:
        backbone.load_weights(path)
    except (ValueError, OSError) as exc:
        raise CtedgeError(f"{path}: not EfficientNetB3 no-top weights ({exc})") from None
    return backbone


def _imagenet_layout(backbone: keras.Model) -> keras.Model:
    """``backbone`` rebuilt as Keras builds it for ``weights="imagenet"``: one more
    Rescaling (1/sqrt(ImageNet stddev)) after its Normalization, which the
    ImageNet weights expect. Done on the config, so no download is attempted."""
    from keras.src.applications import efficientnet

    config = copy.deepcopy(backbone.get_config())
    norm = next(layer["name"] for layer in config["layers"] if layer["class_name"] == "Normalization")
    consumer = next(layer for layer in config["layers"] if _reads_from(layer["inbound_nodes"], norm))
    extra = {"module": "keras.layers", "class_name": "Rescaling", "registered_name": None,
             "name": "imagenet_stddev_rescaling",
             "config": {"name": "imagenet_stddev_rescaling", "trainable": True, "dtype": "float32",
                        "scale": [1.0 / math.sqrt(s) for s in efficientnet.IMAGENET_STDDEV_RGB],
                        "offset": 0.0},
             "inbound_nodes": copy.deepcopy(consumer["inbound_nodes"])}
    consumer["inbound_nodes"] = _renamed(consumer["inbound_nodes"], norm, extra["name"])
    at = config["layers"].index(consumer)
    config["layers"].insert(at, extra)
    return keras.Model.from_config(config)


def _reads_from(node, name: str) -> bool:
    if isinstance(node, dict):
        history = node.get("keras_history")
        return (history is not None and history[0] == name) or any(_reads_from(v, name) for v in node.values())
    return isinstance(node, (list, tuple)) and any(_reads_from(v, name) for v in node)


def _renamed(node, old: str, new: str):
    """A copy of a layer's inbound nodes with tensors of layer ``old`` read from ``new``."""
    if isinstance(node, dict):
        if node.get("keras_history") and node["keras_history"][0] == old:
            return {**node, "keras_history": [new, *node["keras_history"][1:]]}
        return {k: _renamed(v, old, new) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_renamed(v, old, new) for v in node]
    return node


def run_model_path(weights: str | None) -> Path | None:
    """The trained ctedge model that ``weights`` names (a ``.keras`` file, or a
    run folder / tuning project holding model.keras / best_model.keras), else None."""
    if not is_pretrained(weights):
        return None
    path = Path(weights)
    if path.suffix == ".keras":
        if not path.is_file():
            raise CtedgeError(f": no such model {path}", param="weights")
        return path
    if path.is_dir():
        for name in ("model.keras", "best_model.keras"):
            if (path / name).is_file():
                return path / name
        raise CtedgeError(f"{path}: a folder without model.keras or best_model.keras", param="weights")
    return None


def saved_backbone(weights: str | None) -> str | None:
    """The backbone (b3 | tiny) recorded in the run configuration of the trained
    model that ``weights`` names, or None."""
    run = run_model_path(weights)
    config = RunConfig.load(run) if run is not None else None
    return config.model.backbone if config else None


def backbone_kind(backbone: keras.Model) -> str:
    """b3 or tiny, from the name Keras's builder gave the backbone."""
    return "tiny" if backbone.name == TINY["name"] else "b3"


def _run_backbone(path: Path, shape: tuple[int, int, int], backbone: str) -> keras.Model:
    """The backbone of a trained ctedge model exactly as trained (its own layers,
    weights and BatchNorm statistics; no extra rescaling as the ImageNet .h5 path
    has), rebuilt from its config when the input size differs."""
    trained = backbone_of(load_model(path))
    if backbone_kind(trained) != backbone:
        raise CtedgeError(f"{path}: its backbone is {backbone_kind(trained)}, not {backbone}; "
                          f"set backbone to {backbone_kind(trained)}", param="weights")
    if tuple(trained.input_shape[1:]) == shape:
        return trained
    config = trained.get_config()
    inputs = [layer for layer in config["layers"] if layer["class_name"] == "InputLayer"]
    inputs[0]["config"]["batch_shape"] = (None, *shape)
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(trained.get_weights())
    return rebuilt


def _weights_file(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise CtedgeError(f": no such file {path} (use imagenet, none or a path)", param="weights")
    return path


def _scratch_momentum(backbone: keras.Model) -> keras.Model:
    """From scratch on a few hundred images, Keras's BatchNorm momentum (0.99)
    leaves the inference statistics near their initial values for hundreds of
    steps; 0.9 lets validation track training within an epoch or two."""
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.9
    return backbone


def _build_tiny(weights: str, shape: tuple[int, int, int]) -> keras.Model:
    """The tiny test backbone: random, or a local weights file saved from one."""
    from keras.src.applications import efficientnet

    if weights == "imagenet":
        raise CtedgeError("the tiny backbone has no pretrained weights (it is for tests): "
                          "use --weights none or a file saved from a tiny backbone")
    backbone = efficientnet.EfficientNet(**TINY, include_top=False, weights=None, input_shape=shape)
    if not is_pretrained(weights):
        return _scratch_momentum(backbone)
    path = _weights_file(weights)
    try:
        backbone.load_weights(path)
    except (ValueError, OSError) as exc:
        raise CtedgeError(f"{path}: not weights of the tiny backbone ({exc})") from None
    return backbone


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone of a ctedge classifier (B3 or tiny, any saved name)."""
    try:
        return next(layer for layer in model.layers if isinstance(layer, keras.Model))
    except StopIteration:
        raise CtedgeError(f"{model.name}: no nested backbone model in it") from None


def _block_id(layer_name: str) -> int | None:
    match = re.match(r"block(\d)", layer_name)
    return int(match.group(1)) if match else None


def set_trainable(backbone: keras.Model, freeze: bool, fine_tune_blocks: int,
                  pretrained: bool = False) -> None:
    """Freeze the backbone, or train its top ``fine_tune_blocks`` blocks (plus
    the top conv, BatchNorm layers staying frozen), or all of it: with
    ``pretrained`` weights its BatchNorm layers stay frozen then too, since
    Keras 3's ``fit`` passes ``training=True`` through the ``training=False``
    of the model's call (keras-team/keras#20285) and would move their statistics."""
    if not freeze and not fine_tune_blocks:
        backbone.trainable = True
        if pretrained:
            for layer in backbone.layers:
                if isinstance(layer, layers.BatchNormalization):
                    layer.trainable = False
        return
    backbone.trainable = bool(fine_tune_blocks)
    first = 8 - fine_tune_blocks
    for layer in backbone.layers:
        block = _block_id(layer.name)
        top = layer.name.startswith("top_")
        layer.trainable = bool(fine_tune_blocks) and (top or (block is not None and block >= first))
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False


def add_head(features, units: int, dropout: float = 0.0, pool_size: int = 4):
    """The paper's head on a backbone feature map (or its cached copy)."""
    pool = min(pool_size, int(features.shape[1]))
    x = layers.AveragePooling2D(pool_size=pool, name="head_pool")(features)
    x = layers.Flatten(name="head_flatten")(x)
    x = layers.Dense(units, activation="relu", name="head_dense")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return layers.Dense(1, activation="sigmoid", name="head_output")(x)


def build_model(model_config: ModelConfig, preprocess_config: PreprocessConfig,
                backbone: keras.Model | None = None) -> keras.Model:
    """The full classifier: raw 0-255 image in, P(positive) out; on ``backbone`` when
    given (one already built from ``model_config``), else on a new one."""
    size = preprocess_config.image_size
    if size < MIN_IMAGE_SIZE:
        raise CtedgeError(f"{size} is too small for EfficientNet ({MIN_IMAGE_SIZE} or more)", param="image_size")
    if not 0 <= model_config.fine_tune_blocks <= BLOCKS:
        raise CtedgeError(f"must be 0-{BLOCKS}, not {model_config.fine_tune_blocks}", param="fine_tune_blocks")
    if backbone is None:
        backbone = build_backbone(model_config.weights, size, model_config.backbone)
    pretrained = is_pretrained(model_config.weights)
    freeze = pretrained if model_config.freeze_backbone is None else model_config.freeze_backbone
    set_trainable(backbone, freeze, model_config.fine_tune_blocks, pretrained)
    inputs = keras.Input((size, size, 3), name="image")
    x = CTPreprocess(preprocess_config.window_low, preprocess_config.window_high,
                     preprocess_config.centre, name="ct_preprocess")(inputs)
    # Pretrained BatchNorm statistics stay fixed (the usual transfer-learning
    # recipe); a backbone trained from scratch must learn its own.
    features = backbone(x, training=False if pretrained else None)
    outputs = add_head(features, model_config.units, model_config.dropout, model_config.pool_size)
    return keras.Model(inputs, outputs, name=f"ctedge_efficientnet{model_config.backbone}")


def load_model(path: str | Path) -> keras.Model:
    """Load a saved ``.keras`` classifier, with a clear error for a bad path."""
    path = Path(path)
    if not path.is_file():
        raise CtedgeError(f"model not found: {path}")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad archive
        raise CtedgeError(f"{path}: not a loadable Keras model ({exc})") from None
