"""Cached backbone features for `ctedge tune`'s fast mode, and the callbacks and
batches every trial uses.

The frozen backbone runs once over the training images (K augmented views each)
and the validation images; the features are cached on disk under a key of what
they depend on, and trials train only the head on them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from ctedge.core.errors import CtedgeError
from ctedge.core.files import file_digest
from ctedge.core.metrics import roc_auc
from ctedge.core.preprocess import PreprocessConfig, augment
from ctedge.training.model import ModelConfig, build_model, run_model_path

log = logging.getLogger(__name__)


def weights_identity(weights: str) -> str:
    """imagenet / none as they are; a weights file or trained model by its content."""
    run = run_model_path(weights)
    if run is not None:
        return f"sha256:{file_digest(run)}"
    return f"sha256:{file_digest(weights)}" if Path(weights).is_file() else weights


class ExactValAUC(keras.callbacks.Callback):
    """Replaces Keras's binned ``val_auc`` (200 thresholds: it reads exactly 0.5
    when every output falls in one bin) by the exact rank AUC, before early
    stopping, the tuner's checkpoint and the history read it.

    A head on cached features is called eagerly (``predict`` would trace it anew
    every trial); a full model goes through ``predict``, because an eager call
    of a functional model keeps every layer's output until it returns (B3 at
    300 px, 64 images: over 20 GB)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, eager: bool = True):
        super().__init__()
        self.x, self.y, self.batch_size, self.eager = x, y, batch_size, eager

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or "val_auc" not in logs:
            return
        if self.eager:
            p = np.concatenate([keras.ops.convert_to_numpy(self.model(self.x[i:i + self.batch_size],
                                                                      training=False))[:, 0]
                                for i in range(0, len(self.x), self.batch_size)])
        else:
            p = self.model.predict(self.x, batch_size=self.batch_size, verbose=0)[:, 0]
        logs["val_auc"] = roc_auc(self.y, p)


class ViewBatches(keras.utils.PyDataset):
    """Cached features as the naive search sees images: each epoch one pass over the
    training images, each image as one of its K cached views (drawn by seed and
    epoch), shuffled. So a cached trial takes the naive trial's number of steps."""

    def __init__(self, x: np.ndarray, y: np.ndarray, views: int, batch_size: int, seed: int):
        super().__init__()
        if len(x) % views:
            raise CtedgeError(f"cached features: {len(x)} rows are not {views} views of each image")
        self.x, self.y = x, y.astype("float32")
        self.images, self.views = len(x) // views, views
        self.batch_size, self.seed = batch_size, seed
        self.start_at(0)

    def __len__(self) -> int:
        return int(np.ceil(self.images / self.batch_size))

    def __getitem__(self, index: int):
        rows = self.rows[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self.start_at(self.epoch + 1)

    def start_at(self, epoch: int) -> None:
        """Rows of ``epoch``: view v of image i is row v * images + i."""
        self.epoch = epoch
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(self.images)
        self.rows = rng.integers(0, self.views, self.images)[order] * self.images + order


class EpochSeconds(keras.callbacks.Callback):
    """Each epoch's wall time (validation included) into the logs and history."""

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self.started


def cache_key(hashes: list[str], preprocess: PreprocessConfig, model_config: ModelConfig,
              views: int, seed: int, weights: str) -> str:
    """Data hash + image size + backbone and its weights (``weights_identity``: a local
    file by its content) + preprocessing + views: what the features depend on."""
    blob = json.dumps({"files": hashes, "preprocess": preprocess.to_dict(), "weights": weights,
                       "backbone": model_config.backbone, "views": views, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def backbone_features(backbone: keras.Model, preprocess: PreprocessConfig, *images: np.ndarray,
                      batch_size: int = 32) -> list[np.ndarray]:
    """The frozen backbone's feature maps (preprocessing included) of each array of model
    inputs, through one extractor: Keras traces its predict step for the first full batch
    and once more for any other size, then reuses it for every array (B3 on two cores:
    seconds per trace)."""
    from ctedge.training.model import CTPreprocess

    inputs = keras.Input(images[0].shape[1:])
    pixels = CTPreprocess(preprocess.window_low, preprocess.window_high, preprocess.centre)(inputs)
    extractor = keras.Model(inputs, backbone(pixels, training=False))
    return [extractor.predict(x, batch_size=batch_size, verbose=0) for x in images]


def cached_features(directory: Path, parts: dict, preprocess: PreprocessConfig, model_config: ModelConfig,
                    views: int, seed: int, weights: str,
                    backbone_of_run: Callable[[], keras.Model]) -> dict[str, np.ndarray]:
    """Train features for K augmented views per image and val features, on disk;
    ``backbone_of_run`` is called only when they are not cached yet."""
    key = cache_key(parts["train"].hashes + parts["val"].hashes, preprocess, model_config, views, seed,
                    weights)
    path = directory / f"features-{key}.npz"
    if path.is_file():
        log.info("using cached backbone features %s", path)
        with np.load(path) as cached:
            return dict(cached)
    backbone = backbone_of_run()
    rng = np.random.default_rng(seed)
    train_x, train_y = [parts["train"].x], [parts["train"].y]
    for _ in range(views - 1):
        train_x.append(np.stack([augment(image, rng, preprocess.augment) for image in parts["train"].x]))
        train_y.append(parts["train"].y)
    started = time.perf_counter()
    train_features, val_features = backbone_features(backbone, preprocess, np.concatenate(train_x), parts["val"].x)
    features = {"train_x": train_features, "train_y": np.concatenate(train_y).astype("float32"),
                "val_x": val_features, "val_y": parts["val"].y.astype("float32")}
    log.info("backbone features for %d images in %.1f s, cached in %s",
             len(features["train_y"]) + len(features["val_y"]), time.perf_counter() - started, path)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **features)
    os.replace(tmp, path)
    return features


def assemble(head: keras.Model, model_config: ModelConfig, preprocess: PreprocessConfig,
             hp: dict, backbone: keras.Model) -> keras.Model:
    """``backbone`` (the one the cached features came from) + a head trained on them:
    the deployable classifier."""
    config = ModelConfig(**{**model_config.to_dict(), "units": hp["units"],
                            "dropout": hp.get("dropout", 0.0), "freeze_backbone": True})
    model = build_model(config, preprocess, backbone)
    for layer in head.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    return model
