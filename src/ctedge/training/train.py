"""`ctedge train`: fit the classifier with the paper's defaults.

The split is made before anything else; augmentation is applied per batch to
the training part only (``AugmentedBatches``), never inside the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import keras
import numpy as np

from ctedge.core.data import DataOptions, LoadedSplit
from ctedge.core.errors import CtedgeError
from ctedge.core.files import atomic_write, remove_stale_temps, temp_name
from ctedge.core.plots import training_curves
from ctedge.core.preprocess import AugmentConfig, PreprocessConfig, augment
from ctedge.core.progress import ProgressFn, report
from ctedge.core.runconfig import RunConfig, TrainConfig
from ctedge.training.model import ModelConfig, build_model
from ctedge.training.splits import load_data

log = logging.getLogger(__name__)
RESUME_DIR = "resume"  # in the run folder while training: what --resume continues from


class AugmentedBatches(keras.utils.PyDataset):
    """Shuffled, augmented batches of the training split, reproducible by seed."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int,
                 augment_config: AugmentConfig, seed: int):
        super().__init__()
        self.x, self.y = x, y.astype("float32")
        self.batch_size = batch_size
        self.augment_config = augment_config
        self.seed = seed
        self.epoch = 0
        self.order = np.random.default_rng(seed).permutation(len(x))

    def __len__(self) -> int:
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        batch = self.x[rows]
        if self.augment_config.enabled:
            batch = np.stack([augment(image, rng, self.augment_config) for image in batch])
        return batch, self.y[rows]

    def on_epoch_end(self) -> None:
        self.start_at(self.epoch + 1)

    def start_at(self, epoch: int) -> None:
        """The order and augmentation of ``epoch``, as an uninterrupted run has them."""
        self.epoch = epoch
        rng = np.random.default_rng((self.seed, epoch) if epoch else self.seed)
        self.order = rng.permutation(len(self.x))


class EpochProgress(keras.callbacks.Callback):
    """Epochs and batches as progress events, each epoch's metrics and images per
    second as a line; records images per second in the logs (history)."""

    def __init__(self, epochs: int, steps: int, images: int, progress: ProgressFn | None):
        super().__init__()
        self.epochs, self.steps, self.images, self.progress = epochs, steps, images, progress

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        report(self.progress, "batches", "", 0, self.steps)

    def on_train_batch_end(self, batch, logs=None):
        report(self.progress, "batches", "", batch + 1, self.steps)

    def on_epoch_end(self, epoch, logs=None):
        rate = self.images / (time.perf_counter() - self.started)
        logs = logs if logs is not None else {}
        logs["images_per_s"] = rate
        summary = " ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "images_per_s")
        report(self.progress, "epochs", f"epoch {epoch + 1}: {summary}, {rate:.1f} images/s",
               epoch + 1, self.epochs)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("train-%Y%m%d-%H%M%S")


def save_model(model: keras.Model, path: Path) -> None:
    """``model.save`` through a temp file and a rename: a kill never leaves half a model."""
    remove_stale_temps(path)
    tmp = temp_name(path, ".keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Checkpoints(keras.callbacks.Callback):
    """Kill-safe epoch ends (``train --resume``): the best model so far
    (``model.keras``) and, after every epoch, the weights with optimizer state
    plus the early-stopping and best-so-far state (``resume/``), each written
    to a temp file and renamed. Listed after EarlyStopping so that, resumed,
    it restores that callback's state after the callback resets it."""

    def __init__(self, run_dir: Path, monitor: str, save_best: bool, settings: dict,
                 stopping: keras.callbacks.EarlyStopping | None, state: dict | None = None):
        super().__init__()
        self.run_dir, self.folder = run_dir, run_dir / RESUME_DIR
        self.monitor, self.save_best, self.settings = monitor, save_best, settings
        self.stopping = stopping
        self.state = state or {"epochs_done": 0, "best": None}

    def on_train_begin(self, logs=None):
        saved = self.state.get("early_stopping")
        if self.stopping is not None and saved:
            self.stopping.wait, self.stopping.best = saved["wait"], saved["best"]
            self.stopping.best_epoch = saved["best_epoch"]
            best = self.run_dir / "model.keras"
            if self.stopping.restore_best_weights and best.is_file():
                self.stopping.best_weights = keras.models.load_model(best, compile=False).get_weights()

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        improved = current is not None and (self.state["best"] is None or current > self.state["best"])
        if improved:
            self.state["best"] = float(current)
            if self.save_best:
                save_model(self.model, self.run_dir / "model.keras")
        self.folder.mkdir(exist_ok=True)
        weights = self.folder / f"epoch-{epoch + 1}.weights.h5"
        tmp = temp_name(weights, ".weights.h5")
        self.model.save_weights(tmp)
        os.replace(tmp, weights)
        self.state.update(epochs_done=epoch + 1, weights=weights.name, settings=self.settings)
        if self.stopping is not None:
            self.state["early_stopping"] = {"wait": self.stopping.wait, "best_epoch": self.stopping.best_epoch,
                                            "best": None if self.stopping.best is None
                                            else float(self.stopping.best)}
        atomic_write(json.dumps(self.state, indent=2).encode(), self.folder / "state.json")
        for old in self.folder.glob("epoch-*.weights.h5"):
            if old != weights:
                old.unlink()


def _callbacks(run_dir: Path, config: TrainConfig, has_val: bool, settings: dict,
               state: dict | None) -> list:
    monitor = "val_auc" if has_val else "auc"
    callbacks = [keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=state is not None),
                 keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"))]
    stopping = None
    if config.early_stopping:
        stopping = keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=config.patience,
                                                 restore_best_weights=True)
        callbacks.append(stopping)
    callbacks.append(Checkpoints(run_dir, monitor, config.checkpoint_best, settings, stopping, state))
    return callbacks


def resume_state(run_dir: Path, settings: dict, resume: bool) -> dict | None:
    """The saved state of an interrupted run in ``run_dir`` when resuming (its
    settings must match, but for --epochs); refuses to start over one unasked."""
    path = run_dir / RESUME_DIR / "state.json"
    if not resume:
        if path.is_file():
            raise CtedgeError(f"{run_dir} holds an interrupted training run: add --resume to continue it, "
                              "or choose another --out")
        return None
    if not path.is_file():
        raise CtedgeError(f"nothing to resume in {run_dir} (no {RESUME_DIR}/state.json: the run finished, "
                          "or never finished an epoch)")
    try:
        state = json.loads(path.read_text())
        saved = state["settings"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CtedgeError(f"{path}: not a valid resume state ({exc})") from None
    now = json.loads(json.dumps(settings))
    changed = [f"{part}.{key}" for part, values in now.items() for key, value in values.items()
               if (part, key) != ("train", "epochs") and saved.get(part, {}).get(key) != value]
    if changed:
        raise CtedgeError(f": {run_dir} was started with other settings ({', '.join(changed)}); "
                          "resume with the same options (only epochs may change)", param="resume")
    return state


def compile_model(model: keras.Model, learning_rate: float, eager: bool = False) -> None:
    """Adam, binary cross-entropy, AUC and accuracy, the optimizer built on the model's
    trainable variables. Left to Keras (no distribution strategy), Adam's slots are made
    inside the first traced training step, and TensorFlow traces that step twice (once
    making variables, once not); built here, it is traced once, and weights loaded before
    fitting (a resume, a Hyperband warm start) bring the optimizer's state with them.
    ``eager``: Keras's ``run_eagerly`` (no graph tracing: faster for a few dozen small
    images, slower on real data; for debugging)."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
                  run_eagerly=eager)
    model.optimizer.build(model.trainable_variables)


def fit(model: keras.Model, train: LoadedSplit, val: LoadedSplit | None, config: TrainConfig,
        augment_config: AugmentConfig, callbacks: list, done: int = 0,
        progress: ProgressFn | None = None) -> dict[str, list[float]]:
    """Fit on augmented training batches from epoch ``done``; returns Keras's history dict."""
    batches = AugmentedBatches(train.x, train.y, config.batch_size, augment_config, config.seed)
    batches.start_at(done)
    epochs = EpochProgress(config.epochs, len(batches), len(train.y), progress)
    validation = (val.x, val.y.astype("float32")) if val is not None and len(val.y) else None
    history = model.fit(batches, validation_data=validation, epochs=config.epochs, initial_epoch=done,
                        callbacks=[epochs, *callbacks], verbose=0)
    return history.history


def read_history(path: Path, epochs: int | None = None) -> dict[str, list[float]]:
    """history.csv as Keras's history dict; with ``epochs``, first cut it to those
    epochs (rows a killed run wrote after its last saved state go)."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if epochs is not None:
        rows = [r for r in rows if int(r["epoch"]) < epochs]
        fields = list(rows[0]) if rows else []
        lines = [",".join(fields)] + [",".join(r[k] for k in fields) for r in rows]
        atomic_write(("\n".join(lines) + "\n").encode() if rows else b"", path)
    return {k: [float(r[k]) for r in rows] for k in (rows[0] if rows else {}) if k != "epoch"}


def recalibrate_batchnorm(model: keras.Model, x: np.ndarray, batch_size: int = 32) -> int:
    """Precise BatchNorm: recompute the moving statistics of trainable BatchNorm
    layers as the plain average over ``x`` under the final weights.

    Trained from scratch on a few hundred images, the exponential moving
    averages lag the weights, and inference-mode outputs collapse towards a
    constant. Returns the number of layers recalibrated.
    """
    norms = [layer for layer in _all_layers(model)
             if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not norms:
        return 0
    momenta = [layer.momentum for layer in norms]
    for step, start in enumerate(range(0, len(x), batch_size)):
        for layer in norms:
            layer.momentum = step / (step + 1)  # running mean of batch statistics
        model(x[start:start + batch_size], training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
    return len(norms)


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def train(data: DataOptions, train_config: TrainConfig, model_config: ModelConfig,
          preprocess_config: PreprocessConfig, run_dir: Path | None = None, resume: bool = False,
          progress: ProgressFn | None = None, eager: bool = False) -> dict:
    """Train and write the run folder; returns the run's config/summary dict.

    ``resume``: continue the interrupted run in ``run_dir`` from its last finished
    epoch (weights, optimizer state, data order, best-so-far and early stopping).
    ``progress`` hears decoding, epochs and batches (``ctedge.core.progress``).
    ``eager``: run Keras eagerly, without graph tracing (``compile_model``)."""
    for name in ("epochs", "batch_size"):
        if getattr(train_config, name) < 1:
            raise CtedgeError(f"must be at least 1, not {getattr(train_config, name)}", param=name)
    if resume and run_dir is None:
        raise CtedgeError("is needed to resume: the interrupted run's folder", param="run_dir")
    keras.utils.set_random_seed(train_config.seed)
    run_dir = Path(run_dir or default_run_dir())
    settings = {"data": asdict(data), "train": asdict(train_config), "model": model_config.to_dict(),
                "preprocess": preprocess_config.to_dict()}
    state = resume_state(run_dir, settings, resume)
    done = state["epochs_done"] if state else 0
    if done >= train_config.epochs:
        raise CtedgeError(f"must be above the {done} epoch(s) {run_dir} already ran, to go on", param="epochs")
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset, parts = load_data(data, preprocess_config, ("train", "val", "test"), progress)
    train_part, val_part = parts["train"], parts["val"]
    has_val = bool(len(val_part.y))
    model = build_model(model_config, preprocess_config)
    compile_model(model, train_config.learning_rate, eager)
    if state:
        model.load_weights(run_dir / RESUME_DIR / state["weights"])
        read_history(run_dir / "history.csv", done)
        report(progress, "epochs", f"resuming {run_dir} after epoch {done} of {train_config.epochs}",
               done, train_config.epochs)
    started = time.perf_counter()
    history = fit(model, train_part, val_part if has_val else None, train_config,
                  preprocess_config.augment, _callbacks(run_dir, train_config, has_val, settings, state), done,
                  progress)
    seconds = time.perf_counter() - started
    if state:
        history = read_history(run_dir / "history.csv")
    if train_config.checkpoint_best and (run_dir / "model.keras").is_file():
        model.load_weights(run_dir / "model.keras")
    if recalibrate_batchnorm(model, train_part.x, train_config.batch_size * 2):
        log.info("recalibrated BatchNorm statistics on the training images (backbone trained from scratch)")
    save_model(model, run_dir / "model.keras")
    training_curves(history, run_dir / "training_curves.png")
    monitor = "val_auc" if has_val else "auc"
    config = RunConfig(
        kind="train", data=data, train=train_config, model=model_config, preprocess=preprocess_config,
        classes=dataset.class_names, positive=dataset.positive,
        splits={name: part.summary() for name, part in parts.items()},
        files={name: dict(zip(map(str, part.paths), part.hashes)) for name, part in parts.items()},
        result={
            "epochs_run": len(history.get("loss", [])),
            "best_" + monitor: float(max(history.get(monitor, [float("nan")]))),
            "seconds": seconds,
            "images_per_s": float(np.median(history["images_per_s"])),
        })
    config.save(run_dir / "config.json")
    shutil.rmtree(run_dir / RESUME_DIR, ignore_errors=True)  # finished: nothing left to resume
    return config.to_dict()

