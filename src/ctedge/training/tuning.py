"""`ctedge tune`: Keras Tuner search of head width, learning rate and dropout.

Kept apart as in Keras Tuner: ``SearchSpace`` (what may vary), ``HeadHyperModel``
(how a trial's model is built), ``paper_first`` oracles (which values come
next: the paper's defaults first, then the algorithm's; a time budget stops the
search) and the tuner (``CtedgeTuner``: times trials and clears Keras state).

Fast mode (default with a frozen backbone): the backbone runs once over the
training images (K augmented views each) and validation, the features are
cached on disk (``ctedge.training.features``), and trials train only the head on
them, an epoch being one pass over the images (each as one of its views), as in the naive search. ``--fine-tune`` (or
``--no-cache``) trains full models, the backbone recomputed every epoch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import keras_tuner as kt
from keras_tuner.src import utils as kt_utils
from keras_tuner.src.distribute import utils as dist_utils
from keras_tuner.src.engine import tuner_utils

from ctedge.core.choices import Algorithm, Objective, Role
from ctedge.core.data import DataOptions
from ctedge.core.errors import CtedgeError
from ctedge.core.files import exclusive_lock
from ctedge.core.preprocess import PreprocessConfig
from ctedge.core.progress import ProgressFn, report
from ctedge.core.results import save_json
from ctedge.core.runconfig import RunConfig, TuneResult
from ctedge.training.features import (
    EpochSeconds,
    ExactValAUC,
    ViewBatches,
    assemble,
    cached_features,
    weights_identity,
)
from ctedge.training.model import ModelConfig, add_head, build_backbone, build_model, is_pretrained
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
                 preprocess_config: PreprocessConfig, eager: bool = False):
        super().__init__()
        self.feature_shape = feature_shape
        self.model_config = model_config
        self.preprocess_config = preprocess_config
        self.eager = eager  # compile_model's: no graph tracing

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        units, dropout = hp.get("units"), hp.get("dropout") if "dropout" in hp.values else 0.0
        if self.feature_shape is not None:
            inputs = keras.Input(self.feature_shape, name="features")
            model = keras.Model(inputs, add_head(inputs, units, dropout, self.model_config.pool_size))
        else:
            config = ModelConfig(**{**self.model_config.to_dict(), "units": units, "dropout": dropout})
            model = build_model(config, self.preprocess_config)
        compile_model(model, hp.get("learning_rate"), self.eager)
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


class CtedgeTuner(kt.Hyperband):
    """Times each trial, remembers which it ran, and clears Keras's global
    state after each, so memory does not grow trial after trial.

    A ``kt.Hyperband`` so that its ``run_trial`` and ``_build_hypermodel`` run:
    with a Hyperband oracle a trial trains ``tuner/initial_epoch`` to
    ``tuner/epochs``, warm-started from its parent trial's best checkpoint (weights and
    Adam's state: ``compile_model`` builds the optimizer before the load);
    other oracles set no ``tuner/*`` values and those steps do nothing. Its
    ``__init__`` (which would make a second oracle) is skipped for Tuner's."""

    def __init__(self, oracle, hypermodel, trial_processes: bool = False, seed: int = 42,
                 progress: ProgressFn | None = None, **kwargs):
        kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)
        self.ran: list[str] = []
        self.trial_processes, self.seed, self.progress = trial_processes, seed, progress

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
        report(self.progress, "trials", f"trial {trial.trial_id} {trial.status.lower()}: {values}; {score}"
               + (f", {seconds:.1f} s" if seconds is not None else ""), len(self.ran), self.oracle.max_trials)
        keras.backend.clear_session()


def fit_trial(hypermodel: kt.HyperModel, hp_config: dict, warm_start: str | None, seed: int,
              args: tuple, kwargs: dict) -> tuple[dict, dict, int]:
    """One trial in a fresh process: build (warm-started from its Hyperband parent's
    checkpoint), fit; returns the history, the build config and the process id."""
    keras.utils.set_random_seed(seed)
    hp = kt.HyperParameters.from_config(hp_config)
    model = hypermodel.build(hp)
    if warm_start:  # as kt.Hyperband._build_hypermodel does in the search's process
        model.load_weights(warm_start)
    history = hypermodel.fit(hp, model, *args, **kwargs)
    return history.history, model.get_build_config(), os.getpid()


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
    eager: bool = False  # trials run eagerly, no graph tracing (train's --eager)
    batch_size: int = 16
    patience: int = 5
    seed: int = 42


def _fingerprint(space: SearchSpace, hashes: list[str], preprocess: PreprocessConfig,
                 model_config: ModelConfig, options: TuneOptions, cached: bool, weights: str) -> dict:
    return {"search_space": asdict(space),
            "data": hashlib.sha256("".join(hashes).encode()).hexdigest()[:16],
            "preprocess": preprocess.to_dict(), "weights": weights,
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
    save_json(fingerprint, path)


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


def tune(data: DataOptions, model_config: ModelConfig, preprocess: PreprocessConfig,
         options: TuneOptions, space: SearchSpace | None = None, progress: ProgressFn | None = None) -> dict:
    """Run (or resume) a search; returns the summary also written to summary.json.
    The single-process run or the chief holds DIRECTORY/PROJECT.lock meanwhile;
    ``progress`` hears decoding and each finished trial."""
    _validate(options)
    space = (space or SearchSpace()).validate()
    project = options.project or f"{Path(data.root).resolve().name}-{preprocess.image_size}"
    project_dir = Path(options.directory) / project
    with contextlib.ExitStack() as held:
        if not (dist_utils.has_chief_oracle() and not dist_utils.is_chief_oracle()):  # workers share it
            held.enter_context(exclusive_lock(Path(options.directory) / f"{project}.lock",
                                              f"tuning project {project_dir}"))
        return _search(data, model_config, preprocess, options, space, project_dir, progress)


def _backbone_once(model_config: ModelConfig, preprocess: PreprocessConfig, seed: int):
    """The backbone, built on the first call only (a trained .keras loaded once): the
    cached features and the best model share it."""

    @functools.cache
    def backbone() -> keras.Model:
        keras.utils.set_random_seed(seed)  # a random-init backbone is reproducible too
        return build_backbone(model_config.weights, preprocess.image_size, model_config.backbone)

    return backbone


def _search(data: DataOptions, model_config: ModelConfig, preprocess: PreprocessConfig,
            options: TuneOptions, space: SearchSpace, project_dir: Path, progress: ProgressFn | None) -> dict:
    from ctedge import __version__

    project = project_dir.name
    keras.utils.set_random_seed(options.seed)
    dataset, parts = load_data(data, preprocess, ("train", "val"), progress)
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
    weights = weights_identity(model_config.weights)  # hashes a weights file: once per search
    _guard_project(project_dir, _fingerprint(space, parts["train"].hashes + parts["val"].hashes,
                                             preprocess, model_config, options, cached, weights))
    backbone = _backbone_once(model_config, preprocess, options.seed)
    if cached:
        features = cached_features(project_dir, parts, preprocess, model_config,
                                   options.views, options.seed, weights, backbone)
        x = ViewBatches(features["train_x"], features["train_y"], options.views, options.batch_size,
                        options.seed)
        validation = (features["val_x"], features["val_y"])
        hypermodel = HeadHyperModel(features["train_x"].shape[1:], model_config, preprocess, options.eager)
    else:  # augmented batches, as `ctedge train` feeds them
        x = AugmentedBatches(parts["train"].x, parts["train"].y, options.batch_size,
                             preprocess.augment, options.seed)
        validation = (parts["val"].x, parts["val"].y.astype("float32"))
        full = ModelConfig(**{**model_config.to_dict(),
                              "freeze_backbone": False if options.fine_tune else model_config.freeze_backbone})
        hypermodel = HeadHyperModel(None, full, preprocess, options.eager)
    tuner = CtedgeTuner(oracle=_oracle(options, space), hypermodel=hypermodel, seed=options.seed,
                        trial_processes=not cached if options.trial_processes is None else options.trial_processes,
                        directory=options.directory, project_name=project, overwrite=False, progress=progress)
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
    best = tuner.get_best_models(1)[0]
    if cached:
        model = assemble(best, model_config, preprocess, best_hp, backbone())
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
    _write_project(summary, data, model_config, preprocess, options, dataset, parts)
    return summary


def _write_project(summary: dict, data: DataOptions, model_config: ModelConfig, preprocess: PreprocessConfig,
                   options: TuneOptions, dataset, parts: dict) -> None:
    """config.json (the best model's run configuration) and summary.json in the project."""
    project_dir = Path(summary["project"])
    best_hp = summary["best_hyperparameters"]
    head = {k: best_hp[k] for k in ("units", "dropout") if k in best_hp}
    RunConfig(kind="tune", data=data, model=ModelConfig(**{**model_config.to_dict(), **head}),
              preprocess=preprocess, classes=dataset.class_names, positive=dataset.positive,
              tune=TuneResult(hyperparameters=best_hp, best_score=summary["best_score"], mode=summary["mode"],
                              algorithm=options.algorithm, objective=options.objective,
                              epochs=options.epochs, batch_size=options.batch_size),
              splits={name: part.summary() for name, part in parts.items()},
              files={name: dict(zip(map(str, part.paths), part.hashes)) for name, part in parts.items()},
              ).save(project_dir / "config.json")
    save_json(summary, project_dir / "summary.json")


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
