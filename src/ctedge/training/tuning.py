"""`ctedge tune`: Keras Tuner search of head width, learning rate and dropout.

Kept apart as in Keras Tuner: ``SearchSpace`` (what may vary), ``HeadHyperModel``
(how a trial's model is built), ``paper_first`` oracles (which values come
next: the paper's defaults first, then the algorithm's; a time budget stops the
search) and the tuner (``CtedgeTuner``: times trials and clears Keras state).

Fast mode (default with a frozen backbone): the backbone runs once over the
training images (K augmented views each) and validation, the features are
cached on disk, and trials train only the head on them, an epoch being one
pass over the images (each as one of its views), as in the naive search. ``--fine-tune`` (or
``--no-cache``) trains full models, the backbone recomputed every epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
from keras_tuner.src import utils as kt_utils
from keras_tuner.src.distribute import utils as dist_utils
from keras_tuner.src.engine import tuner_utils

from ctedge.core.choices import Algorithm, Objective, Role
from ctedge.core.data import DataOptions
from ctedge.core.errors import CtedgeError
from ctedge.core.files import atomic_write, exclusive_lock, file_digest
from ctedge.core.metrics import roc_auc
from ctedge.core.preprocess import PreprocessConfig, augment
from ctedge.core.progress import console
from ctedge.core.runconfig import RunConfig, TuneResult
from ctedge.training.model import ModelConfig, add_head, build_backbone, build_model, is_pretrained, run_model_path
from ctedge.training.quiet import import_tensorflow
from ctedge.training.splits import load_data
from ctedge.training.train import AugmentedBatches, compile_model, save_model

log = logging.getLogger(__name__)
ALGORITHMS = {Algorithm.random: kt.oracles.RandomSearchOracle,
              Algorithm.bayesian: kt.oracles.BayesianOptimizationOracle,
              Algorithm.hyperband: kt.oracles.HyperbandOracle}


@dataclass(kw_only=True)
class SearchSpace:
    """Ranges around the paper's defaults (units 256, lr 5e-5, no dropout)."""

    units_min: int = 32
    units_max: int = 1024
    lr_min: float = 1e-5
    lr_max: float = 1e-3
    dropout_max: float = 0.5
    default_units: int = 256
    default_lr: float = 5e-5
    default_dropout: float = 0.0

    def validate(self) -> "SearchSpace":
        if not (0 < self.units_min <= self.default_units <= self.units_max):
            raise CtedgeError(f"search space: units range [{self.units_min}, {self.units_max}] is empty "
                              f"or leaves out the paper's {self.default_units}")
        if not (0 < self.lr_min <= self.default_lr <= self.lr_max):
            raise CtedgeError(f"search space: learning-rate range [{self.lr_min}, {self.lr_max}] is "
                              f"empty or leaves out the paper's {self.default_lr}")
        if not 0 <= self.dropout_max < 1:
            raise CtedgeError(f"search space: dropout_max must be in [0, 1), not {self.dropout_max}")
        if not 0 <= self.default_dropout <= self.dropout_max:
            raise CtedgeError(f"search space: dropout range [0, {self.dropout_max}] leaves out the "
                              f"first trial's {self.default_dropout}")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "SearchSpace":
        """JSON or YAML with any of the fields above."""
        path = Path(path)
        if not path.is_file():
            raise CtedgeError(f"search space file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml
                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
            return cls(**data).validate()
        except (ValueError, TypeError) as exc:
            raise CtedgeError(f"{path}: not a valid search space ({exc})") from None

    def hyperparameters(self) -> kt.HyperParameters:
        hp = kt.HyperParameters()
        hp.Int("units", self.units_min, self.units_max, sampling="log", default=self.default_units)
        hp.Float("learning_rate", self.lr_min, self.lr_max, sampling="log", default=self.default_lr)
        if self.dropout_max:
            hp.Float("dropout", 0.0, self.dropout_max, step=0.1, default=self.default_dropout)
        return hp


class HeadHyperModel(kt.HyperModel):
    """A trial's model: the head on cached features, or the full classifier."""

    def __init__(self, feature_shape: tuple | None, model_config: ModelConfig,
                 preprocess_config: PreprocessConfig):
        super().__init__()
        self.feature_shape = feature_shape
        self.model_config = model_config
        self.preprocess_config = preprocess_config

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        units, dropout = hp.get("units"), hp.get("dropout") if "dropout" in hp.values else 0.0
        if self.feature_shape is not None:
            inputs = keras.Input(self.feature_shape, name="features")
            model = keras.Model(inputs, add_head(inputs, units, dropout, self.model_config.pool_size))
        else:
            config = ModelConfig(**{**self.model_config.to_dict(), "units": units, "dropout": dropout})
            model = build_model(config, self.preprocess_config)
        compile_model(model, hp.get("learning_rate"))
        return model


def paper_first(base: type, deadline: float | None) -> type:
    """An oracle class whose first trial is the paper's defaults and which stops
    creating trials once ``deadline`` (time.time()) has passed.

    The defaults replace the algorithm's first random draw, so they sit inside
    it: Hyperband gives them a bracket and an epoch budget, Bayesian
    optimisation counts them among its initial points."""

    class PaperFirst(base):
        def populate_space(self, trial_id):
            if deadline is not None and time.time() > deadline:
                return {"status": kt.engine.trial.TrialStatus.STOPPED, "values": None}
            return super().populate_space(trial_id)

        def _random_values(self):
            if not self.trials:
                return dict(self.hyperparameters.values)
            return super()._random_values()

    PaperFirst.__name__ = f"PaperFirst{base.__name__}"
    return PaperFirst


def rss_mb() -> float:
    """Resident memory of this process (Linux), to show it does not grow per trial."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@contextlib.contextmanager
def weights_only_warm_start():
    """A Hyperband warm start restores weights, not the optimizer: by design, so quietly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
        yield


class CtedgeTuner(kt.Hyperband):
    """Times each trial, remembers which it ran, and clears Keras's global
    state after each, so memory does not grow trial after trial.

    A ``kt.Hyperband`` so that its ``run_trial`` and ``_build_hypermodel`` run:
    with a Hyperband oracle a trial trains ``tuner/initial_epoch`` to
    ``tuner/epochs``, warm-started from its parent trial's best checkpoint;
    other oracles set no ``tuner/*`` values and those steps do nothing. Its
    ``__init__`` (which would make a second oracle) is skipped for Tuner's."""

    def __init__(self, oracle, hypermodel, trial_processes: bool = False, seed: int = 42, **kwargs):
        kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)
        self.ran: list[str] = []
        self.trial_processes, self.seed = trial_processes, seed

    def _build_and_fit_model(self, trial, *args, **kwargs):
        """With ``trial_processes``, build and fit in a fresh process (what TensorFlow
        keeps after ``clear_session`` goes with it); the checkpoint lands where
        Keras Tuner looks for it, and the history comes back."""
        if not self.trial_processes:
            return super()._build_and_fit_model(trial, *args, **kwargs)
        hp = trial.hyperparameters
        parent = hp.values.get("tuner/trial_id")
        kwargs["callbacks"] = [c for c in kwargs.get("callbacks", [])
                               if not isinstance(c, tuner_utils.TunerCallback)]  # holds the tuner
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=import_tensorflow) as pool:
            history, build_config, pid = pool.submit(
                fit_trial, self.hypermodel, hp.get_config(),
                self._get_checkpoint_fname(parent) if parent else None, self.seed, args, kwargs).result()
        kt_utils.save_json(self._get_build_config_fname(trial.trial_id), build_config)
        if not trial.metrics.exists("pid"):
            trial.metrics.register("pid", direction="min")
        trial.metrics.update("pid", pid)
        result = keras.callbacks.History()
        result.history = history
        return result

    def _build_hypermodel(self, hp):
        with weights_only_warm_start():
            return super()._build_hypermodel(hp)

    def run_trial(self, trial, *args, **kwargs):
        started = time.perf_counter()
        data = args[0] if args else kwargs.get("x")
        if hasattr(data, "start_at"):  # every trial sees the same batches from its first epoch on
            data.start_at(trial.hyperparameters.values.get("tuner/initial_epoch", 0))
        measures = {}
        try:
            results = super().run_trial(trial, *args, **kwargs)
            epochs = [s for r in results if isinstance(r, keras.callbacks.History)
                      for s in r.history.get("epoch_seconds", [])]
            measures = {"epochs_run": len(epochs), "fit_seconds": sum(epochs)}  # the rest: build, load, start
            return results
        finally:
            measures.update(seconds=time.perf_counter() - started, rss_mb=rss_mb())
            for name, value in measures.items():
                if not trial.metrics.exists(name):
                    trial.metrics.register(name, direction="min")
                trial.metrics.update(name, value)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.ran.append(trial.trial_id)
        values = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in trial.hyperparameters.values.items())
        score = "no score" if trial.score is None else f"score {trial.score:.4f}"
        seconds = trial.metrics.get_last_value("seconds") if trial.metrics.exists("seconds") else None
        console.print(f"trial {trial.trial_id} {trial.status.lower()}: {values}; {score}"
                      + (f", {seconds:.1f} s" if seconds is not None else ""), highlight=False, markup=False)
        keras.backend.clear_session()


def fit_trial(hypermodel: kt.HyperModel, hp_config: dict, warm_start: str | None, seed: int,
              args: tuple, kwargs: dict) -> tuple[dict, dict, int]:
    """One trial in a fresh process: build (warm-started from its Hyperband parent's
    checkpoint), fit; returns the history, the build config and the process id."""
    keras.utils.set_random_seed(seed)
    hp = kt.HyperParameters.from_config(hp_config)
    model = hypermodel.build(hp)
    if warm_start:  # as kt.Hyperband._build_hypermodel does in the search's process
        with weights_only_warm_start():
            model.load_weights(warm_start)
    history = hypermodel.fit(hp, model, *args, **kwargs)
    return history.history, model.get_build_config(), os.getpid()


# --- cached backbone features --------------------------------------------------

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
              views: int, seed: int) -> str:
    """Data hash + image size + backbone and its weights (a local file by its content)
    + preprocessing + views: what the features depend on."""
    blob = json.dumps({"files": hashes, "preprocess": preprocess.to_dict(),
                       "weights": weights_identity(model_config.weights),
                       "backbone": model_config.backbone, "views": views, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def backbone_features(backbone: keras.Model, preprocess: PreprocessConfig, x: np.ndarray,
                      batch_size: int = 32) -> np.ndarray:
    """The frozen backbone's feature maps of model inputs (preprocessing included)."""
    from ctedge.training.model import CTPreprocess

    inputs = keras.Input(x.shape[1:])
    pixels = CTPreprocess(preprocess.window_low, preprocess.window_high, preprocess.centre)(inputs)
    extractor = keras.Model(inputs, backbone(pixels, training=False))
    return extractor.predict(x, batch_size=batch_size, verbose=0)


def cached_features(directory: Path, parts: dict, preprocess: PreprocessConfig,
                    model_config: ModelConfig, views: int, seed: int) -> dict[str, np.ndarray]:
    """Train features for K augmented views per image and val features, on disk."""
    key = cache_key(parts["train"].hashes + parts["val"].hashes, preprocess, model_config, views, seed)
    path = directory / f"features-{key}.npz"
    if path.is_file():
        log.info("using cached backbone features %s", path)
        with np.load(path) as cached:
            return dict(cached)
    keras.utils.set_random_seed(seed)  # a random-init backbone is then the one assemble() rebuilds
    backbone = build_backbone(model_config.weights, preprocess.image_size, model_config.backbone)
    rng = np.random.default_rng(seed)
    train_x, train_y = [parts["train"].x], [parts["train"].y]
    for _ in range(views - 1):
        train_x.append(np.stack([augment(image, rng, preprocess.augment) for image in parts["train"].x]))
        train_y.append(parts["train"].y)
    started = time.perf_counter()
    features = {"train_x": backbone_features(backbone, preprocess, np.concatenate(train_x)),
                "train_y": np.concatenate(train_y).astype("float32"),
                "val_x": backbone_features(backbone, preprocess, parts["val"].x),
                "val_y": parts["val"].y.astype("float32")}
    log.info("backbone features for %d images in %.1f s, cached in %s",
             len(features["train_y"]) + len(features["val_y"]), time.perf_counter() - started, path)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **features)
    os.replace(tmp, path)
    return features


# --- the search ------------------------------------------------------------------

@dataclass(kw_only=True)
class TuneOptions:
    algorithm: str = "random"
    max_trials: int = 10
    epochs: int = 20
    time_budget_min: float | None = None
    objective: str = "val_auc"
    directory: str = "tuning"
    project: str | None = None
    overwrite: bool = False
    views: int = 4
    fine_tune: bool = False
    cache: bool = True  # False: the naive way, backbone recomputed every epoch
    trial_processes: bool | None = None  # None: full-model trials each in a fresh process, head trials in this one
    batch_size: int = 16
    patience: int = 5
    seed: int = 42


def _fingerprint(space: SearchSpace, hashes: list[str], preprocess: PreprocessConfig,
                 model_config: ModelConfig, options: TuneOptions, cached: bool) -> dict:
    return {"search_space": asdict(space),
            "data": hashlib.sha256("".join(hashes).encode()).hexdigest()[:16],
            "preprocess": preprocess.to_dict(), "weights": weights_identity(model_config.weights),
            "backbone": model_config.backbone,
            "mode": "cached" if cached else ("fine-tune" if options.fine_tune else "naive"),
            "views": options.views if cached else None,
            "cached_epoch": "one view per image" if cached else None,  # before: every view, every epoch
            "algorithm": options.algorithm, "objective": options.objective}


def _guard_project(project_dir: Path, fingerprint: dict) -> None:
    """Refuse to resume a project whose search space or data changed (Keras
    Tuner would silently carry on with the old trials)."""
    path = project_dir / "ctedge_fingerprint.json"
    if path.is_file():
        old = {"backbone": "b3", **json.loads(path.read_text())}  # projects from before --backbone
        old.get("search_space", {}).setdefault("default_dropout", 0.0)  # and before --dropout
        changed = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        if changed:
            raise CtedgeError(f"project {project_dir} was made with another {', '.join(changed)}; "
                              "use --overwrite to start over or --project NAME for a new one")
    project_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(json.dumps(fingerprint, indent=2).encode(), path)


def _validate(options: TuneOptions) -> None:
    if options.algorithm not in ALGORITHMS:
        raise CtedgeError(f"must be one of {', '.join(ALGORITHMS)}, not {options.algorithm!r}", param="algorithm")
    for name in ("max_trials", "epochs", "views", "batch_size"):
        if getattr(options, name) < 1:
            raise CtedgeError(f"must be at least 1, not {getattr(options, name)}", param=name)
    if options.objective not in Objective.values():
        raise CtedgeError(f"must be {', '.join(Objective.values())}, not {options.objective!r}", param="objective")


def _oracle(options: TuneOptions, space: SearchSpace):
    direction = "min" if options.objective == "val_loss" else "max"
    deadline = time.time() + options.time_budget_min * 60 if options.time_budget_min else None
    common = dict(objective=kt.Objective(options.objective, direction), seed=options.seed,
                  hyperparameters=space.hyperparameters(), max_consecutive_failed_trials=3)
    oracle_class = paper_first(ALGORITHMS[options.algorithm], deadline)
    if options.algorithm == "hyperband":  # brackets from max_epochs (factor 3); --max-trials caps them
        oracle = oracle_class(max_epochs=options.epochs, **common)
        oracle.max_trials = options.max_trials
        return oracle
    return oracle_class(max_trials=options.max_trials, **common)


def trial_table(tuner: kt.Tuner, objective: str, epochs: int) -> list[dict]:
    """Every trial: id, hyperparameters, epoch budget (Hyperband: from its bracket,
    warm-started from ``parent`` at ``initial_epoch``), score, seconds, status; best first."""
    rows = []
    for trial in tuner.oracle.trials.values():
        metrics = trial.metrics
        values = trial.hyperparameters.values
        rows.append({"trial": trial.trial_id, "units": values.get("units"),
                     "learning_rate": values.get("learning_rate"),
                     "dropout": values.get("dropout", 0.0),
                     "epochs": values.get("tuner/epochs", epochs),
                     "initial_epoch": values.get("tuner/initial_epoch", 0),
                     "parent": values.get("tuner/trial_id"),
                     "score": trial.score,
                     "best_epoch": None if trial.best_step is None else trial.best_step + 1,
                     **{name: metrics.get_last_value(name) if metrics.exists(name) else None
                        for name in ("seconds", "rss_mb", "pid", "epochs_run", "fit_seconds")},
                     "status": trial.status})
    sign = -1 if objective != "val_loss" else 1
    return sorted(rows, key=lambda r: (r["score"] is None, sign * (r["score"] or 0), r["trial"]))


def assemble(head: keras.Model, model_config: ModelConfig, preprocess: PreprocessConfig,
             hp: dict, seed: int) -> keras.Model:
    """Backbone + a head trained on cached features: the deployable classifier.
    Seeded as in ``cached_features``, so that with ``--weights none`` the random
    backbone is the very one the features came from."""
    config = ModelConfig(**{**model_config.to_dict(), "units": hp["units"],
                            "dropout": hp.get("dropout", 0.0), "freeze_backbone": True})
    keras.utils.set_random_seed(seed)
    model = build_model(config, preprocess)
    for layer in head.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    return model


def tune(data: DataOptions, model_config: ModelConfig, preprocess: PreprocessConfig,
         options: TuneOptions, space: SearchSpace | None = None) -> dict:
    """Run (or resume) a search; returns the summary also written to summary.json.
    The single-process run or the chief holds DIRECTORY/PROJECT.lock meanwhile."""
    _validate(options)
    space = (space or SearchSpace()).validate()
    project = options.project or f"{Path(data.root).resolve().name}-{preprocess.image_size}"
    project_dir = Path(options.directory) / project
    with contextlib.ExitStack() as held:
        if not (dist_utils.has_chief_oracle() and not dist_utils.is_chief_oracle()):  # workers share it
            held.enter_context(exclusive_lock(Path(options.directory) / f"{project}.lock",
                                              f"tuning project {project_dir}"))
        return _search(data, model_config, preprocess, options, space, project_dir)


def _search(data: DataOptions, model_config: ModelConfig, preprocess: PreprocessConfig,
            options: TuneOptions, space: SearchSpace, project_dir: Path) -> dict:
    from ctedge import __version__

    project = project_dir.name
    keras.utils.set_random_seed(options.seed)
    dataset, parts = load_data(data, preprocess, parts=("train", "val"))
    if not len(parts["val"].y):
        raise CtedgeError("tuning needs a validation split (official lists or --val-fraction)")
    cached = (options.cache and not options.fine_tune and model_config.freeze_backbone is not False
              and not model_config.fine_tune_blocks)
    if cached and not is_pretrained(model_config.weights):
        log.warning("--weights none with a frozen backbone: the cached features come from random "
                    "filters, so expect chance-level scores; use --weights RUN/model.keras (a model trained "
                    "here, e.g. by `ctedge train --weights none`), imagenet or a weights file, or --fine-tune")
    if options.overwrite and project_dir.exists():
        import shutil
        shutil.rmtree(project_dir)
    _guard_project(project_dir, _fingerprint(space, parts["train"].hashes + parts["val"].hashes,
                                             preprocess, model_config, options, cached))
    if cached:
        features = cached_features(project_dir, parts, preprocess, model_config,
                                   options.views, options.seed)
        x = ViewBatches(features["train_x"], features["train_y"], options.views, options.batch_size,
                        options.seed)
        validation = (features["val_x"], features["val_y"])
        hypermodel = HeadHyperModel(features["train_x"].shape[1:], model_config, preprocess)
    else:  # augmented batches, as `ctedge train` feeds them
        x = AugmentedBatches(parts["train"].x, parts["train"].y, options.batch_size,
                             preprocess.augment, options.seed)
        validation = (parts["val"].x, parts["val"].y.astype("float32"))
        full = ModelConfig(**{**model_config.to_dict(),
                              "freeze_backbone": False if options.fine_tune else model_config.freeze_backbone})
        hypermodel = HeadHyperModel(None, full, preprocess)
    tuner = CtedgeTuner(oracle=_oracle(options, space), hypermodel=hypermodel, seed=options.seed,
                        trial_processes=not cached if options.trial_processes is None else options.trial_processes,
                        directory=options.directory, project_name=project, overwrite=False)
    monitor = options.objective
    stop = keras.callbacks.EarlyStopping(monitor=monitor, mode="min" if monitor == "val_loss" else "max",
                                         patience=options.patience)
    started = time.perf_counter()
    tuner.search(x, validation_data=validation, epochs=options.epochs,
                 callbacks=[ExactValAUC(*validation, batch_size=options.batch_size, eager=cached), stop,
                            EpochSeconds()], verbose=0)
    if tuner._is_worker():  # the chief holds the oracle and writes the summary
        return {"role": "worker", "tuner_id": tuner.tuner_id, "project": str(project_dir),
                "trials_run": tuner.ran, "search_seconds": time.perf_counter() - started}
    rows = trial_table(tuner, options.objective, options.epochs)
    completed = [r for r in rows if r["status"] == "COMPLETED"]
    if not completed:
        raise CtedgeError(f"no trial completed in {project_dir}; see the trial folders there")
    best_hp = {k: v for k, v in tuner.get_best_hyperparameters(1)[0].values.items()
               if not k.startswith("tuner/")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # optimizer state is not restored, by design
        best = tuner.get_best_models(1)[0]
    if cached:
        model = assemble(best, model_config, preprocess, best_hp, options.seed)
        how = "backbone + the best trial's head, restored from its checkpoint"
    else:
        model, how = best, "the best trial's full model, restored from its checkpoint"
    save_model(model, project_dir / "best_model.keras")
    summary = {
        "ctedge_version": __version__, "project": str(project_dir),
        "mode": "cached" if cached else ("fine-tune" if options.fine_tune else "naive"),
        "algorithm": options.algorithm, "objective": options.objective, "trials": rows,
        "best_hyperparameters": best_hp, "best_score": completed[0]["score"],
        "best_model": str(project_dir / "best_model.keras"), "best_model_source": how,
        "search_seconds": time.perf_counter() - started, "options": asdict(options),
        "search_space": asdict(space),
    }
    head = {k: best_hp[k] for k in ("units", "dropout") if k in best_hp}
    RunConfig(kind="tune", data=data, model=ModelConfig(**{**model_config.to_dict(), **head}),
              preprocess=preprocess, classes=dataset.class_names, positive=dataset.positive,
              tune=TuneResult(hyperparameters=best_hp, best_score=summary["best_score"], mode=summary["mode"],
                              algorithm=options.algorithm, objective=options.objective,
                              epochs=options.epochs, batch_size=options.batch_size),
              splits={name: part.summary() for name, part in parts.items()},
              files={name: dict(zip(map(str, part.paths), part.hashes)) for name, part in parts.items()},
              ).save(project_dir / "config.json")
    atomic_write(json.dumps(summary, indent=2, default=str).encode(), project_dir / "summary.json")
    return summary


def set_distributed(role: str | None, oracle: str | None, tuner_id: str | None) -> None:
    """Keras Tuner's own chief/worker mode, through its KERASTUNER_* variables."""
    if role is None:
        return
    if role not in Role.values():
        raise CtedgeError(f"must be {' or '.join(Role.values())}, not {role!r}", param="role")
    if not oracle or ":" not in oracle:
        raise CtedgeError(f"must be the chief's HOST:PORT for a {role}, not {oracle!r}", param="oracle")
    host, port = oracle.rsplit(":", 1)
    if not port.isdigit():
        raise CtedgeError(f"port must be a number, not {port!r}", param="oracle")
    os.environ["KERASTUNER_ORACLE_IP"] = host
    os.environ["KERASTUNER_ORACLE_PORT"] = port
    os.environ["KERASTUNER_TUNER_ID"] = "chief" if role == "chief" else (tuner_id or f"worker-{os.getpid()}")
