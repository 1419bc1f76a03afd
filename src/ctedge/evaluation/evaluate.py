"""`ctedge evaluate`: metrics with bootstrap CIs, confusion matrix, ROC, calibration."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve as sk_roc

from ctedge.core.data import SPLITS, DataOptions, LoadedSplit, group_of
from ctedge.core.errors import CtedgeError
from ctedge.core.files import atomic_write, csv_text
from ctedge.core.imageio import DEFAULT_MAX_PIXELS
from ctedge.core.metrics import (
    DEFAULT_RESAMPLES,
    DEFAULT_THRESHOLD,
    bootstrap_ci,
    calibration,
    confusion,
    output_spread,
    point_metrics,
)
from ctedge.core.plots import reliability, roc_curve
from ctedge.core.progress import ProgressFn, tracked
from ctedge.core.results import Estimate, ImageEvaluation, StudyEvaluation, StudyResult, dumps, finite
from ctedge.core.runconfig import RunConfig, data_options_for, keras_preprocess_config
from ctedge.training.splits import load_data


def operating_points(y: np.ndarray, p: np.ndarray, targets=(0.90, 0.95)) -> dict[str, float]:
    """Sensitivity at fixed specificity and specificity at fixed sensitivity."""
    if not 0 < np.sum(y) < len(y):
        return {}
    fpr, tpr, _ = sk_roc(y, p)
    out = {}
    for target in targets:
        out[f"sensitivity_at_specificity_{target:.2f}"] = float(tpr[fpr <= 1 - target].max(initial=0.0))
        out[f"specificity_at_sensitivity_{target:.2f}"] = float(1 - fpr[tpr >= target].min(initial=1.0))
    return out


def merge(parts: list[LoadedSplit]) -> LoadedSplit:
    merged = LoadedSplit(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                         [q for p in parts for q in p.paths], [h for p in parts for h in p.hashes])
    for p in parts:
        merged.unreadable += p.unreadable
        merged.annotated += p.annotated
        merged.dropped += p.dropped
    return merged


def score(y: np.ndarray, p: np.ndarray, threshold: float, groups: np.ndarray | None,
          resamples: int, seed: int) -> dict:
    """Point metrics, CIs, operating points, confusion matrix and ECE."""
    ci = bootstrap_ci(y, p, threshold, resamples, seed, groups)
    point = point_metrics(y, p, threshold)
    *_, ece = calibration(y, p)
    return {
        "metrics": {name: Estimate.of(point[name], ci[name]) for name in point},
        "operating_points": operating_points(y, p),
        "confusion": confusion(y, p, threshold),
        "ece": finite(ece),
    }


def plot_scores(y: np.ndarray, p: np.ndarray, auc: float | None, out: Path, shortcut: dict | None = None) -> dict:
    """roc.png (with the metadata shortcut's curve when given; both classes needed)
    and calibration.png in ``out``; their paths."""

    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    if 0 < y.sum() < len(y):
        fpr, tpr, _ = sk_roc(y, p)
        other = (shortcut["roc"]["fpr"], shortcut["roc"]["tpr"], shortcut["auc"]) if shortcut and "roc" in shortcut else None
        plots["roc_png"] = str(roc_curve(fpr, tpr, auc, out / "roc.png", other))
    plots["calibration_png"] = str(reliability(*calibration(y, p), out / "calibration.png"))
    return plots


def is_external(stored: RunConfig | None, digests: dict[Path, str]) -> bool:
    """True when no file of ``digests`` (path -> sha256 of the data folder's files) is
    one the run trained on (by content): another data set, whatever its folder is
    called. Unknown (no recorded training files): False."""
    trained = set(stored.files.get("train", {}).values()) if stored else set()
    return bool(trained) and not trained & set(digests.values())


def split_check(stored: RunConfig | None, loaded: dict[str, LoadedSplit]) -> dict:
    """Files of each rebuilt split against those recorded at training (by content):
    how many are missing and how many are new; empty when nothing was recorded."""
    recorded = stored.files if stored else {}
    check = {}
    for name, part in loaded.items():
        if name in recorded:
            then, now = set(recorded[name].values()), set(part.hashes)
            check[name] = {"missing": len(then - now), "new": len(now - then)}
    return check


def drift_warning(split: str, drift: dict) -> str:
    """The sentence for a split that is not the one the model was trained with."""
    return (f"the {split} split rebuilt from the data is not the one the model was trained with: "
            f"{drift['missing']} recorded file(s) missing, {drift['new']} new (by content); its figures "
            "are not comparable with the run's")


def external_options(stored: RunConfig | None, root: str | Path,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> DataOptions:
    """Every image of another data set, cleaned as at training: no split lists,
    nothing held out (``test_fraction``/``val_fraction`` 0 put all in train)."""
    positive = stored.positive if stored else None
    if positive and not (Path(root) / positive).is_dir():
        positive = None  # detected from the folder names
    clean = stored.data.clean if stored else "drop"
    return DataOptions(root=str(root), positive=positive, test_fraction=0.0, val_fraction=0.0, clean=clean,
                       max_pixels=max_pixels)


def evaluate(model_path: str | Path, data_root: str | Path, split: str = "val",
             threshold: float = DEFAULT_THRESHOLD, out_dir: str | Path | None = None, resamples: int = DEFAULT_RESAMPLES,
             seed: int = 0, split_dir: str | None = None, group_regex: str | None = None,
             external: bool = False, positive: str | None = None,
             progress: ProgressFn | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageEvaluation:
    """Score a saved Keras model on one split (or all) of a data folder, or on
    every image of an external data set (``external``, or no file there is one
    the run trained on). ``group_regex`` groups the bootstrap only. Each file is
    hashed once; ``progress`` hears the hashing and decoding; an image above
    ``max_pixels`` is skipped as unreadable."""
    from ctedge.training.model import load_model

    if split not in (*SPLITS, "all"):
        raise CtedgeError(f"must be one of {', '.join(SPLITS)}, all; not {split!r}", param="split")
    if not 0.0 < threshold < 1.0:
        raise CtedgeError(f"must be between 0 and 1, not {threshold}", param="threshold")
    model_path = Path(model_path)
    model = load_model(model_path)
    stored = RunConfig.load(model_path)
    digests = _digests(data_root, progress)
    external = external or is_external(stored, digests)
    if external:
        options, split, parts = external_options(stored, data_root, max_pixels), "external", ("train",)
        options.positive = positive or options.positive
    else:
        options = data_options_for(stored, data_root, split_dir=split_dir, positive=positive,
                                   max_pixels=max_pixels)
        parts = SPLITS if split == "all" else (split,)
    _, loaded = load_data(options, keras_preprocess_config(model), parts, progress, digests)
    data = merge([loaded[p] for p in parts])
    if not len(data.y):
        raise CtedgeError(f"the {split} split of {data_root} is empty")
    probabilities = model.predict(data.x, batch_size=32, verbose=0)[:, 0]
    group_regex = group_regex or options.group_regex
    groups = np.array([group_of(p, group_regex) for p in data.paths]) if group_regex else None
    scored = score(data.y, probabilities, threshold, groups, resamples, seed)
    baseline = _shortcut_baseline(options, split)
    out = Path(out_dir or model_path.parent / f"eval-{split}")
    report = ImageEvaluation(
        model=str(model_path), data=asdict(options), split=split, external=external,
        group_regex=group_regex, threshold=threshold, images=len(data.y), positive=int(data.y.sum()),
        groups=len(set(groups)) if groups is not None else None,
        split_drift={} if external else {k: v for k, v in split_check(stored, loaded).items() if any(v.values())},
        **scored, shortcut_baseline=baseline, output_spread=finite(output_spread(probabilities)),
        skipped=data.summary()["unreadable"], dropped_annotated=data.dropped,
        **plot_scores(data.y, probabilities, scored["metrics"]["auc"].value, out, baseline),
        predictions_csv=str(out / "predictions.csv"), out_dir=str(out))
    atomic_write(csv_text(["path", "label", "probability"],
                          [{"path": str(path), "label": label, "probability": p} for path, label, p in
                           zip(data.paths, data.y.tolist(), probabilities.round(6).tolist())]).encode(),
                 out / "predictions.csv")
    atomic_write(dumps(report).encode(), out / "metrics.json")
    return report


def _digests(root: str | Path, progress: ProgressFn | None) -> dict[Path, str]:
    """sha256 of every image of a data folder, hashed once for the external check and the splits."""
    from ctedge.core.data import discover
    from ctedge.core.files import file_digest

    samples = discover(root).samples
    return {s.path: file_digest(s.path) for s in tracked(samples, "hashing", len(samples), progress)}


def _shortcut_baseline(options: DataOptions, split: str) -> dict:
    """The metadata-only baseline, trained on the training part, for a val or test split."""
    if split not in ("val", "test"):  # no training set is known
        return {}
    from ctedge.core.data import discover
    from ctedge.evaluation.audit import metadata_baseline
    from ctedge.training.splits import make_splits

    splits = make_splits(discover(options.root, options.positive), options.split_dir, options.seed,
                         options.test_fraction, options.val_fraction, options.group_regex)
    return metadata_baseline({"train": splits["train"], split: splits[split]}, options.max_pixels).get(split, {})


def evaluate_studies(model_path: str | Path, data_root: str | Path, threshold: float | None = None,
                     out_dir: str | Path | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     positive: str | None = None, options=None, provider: str = "auto",
                     threads: int | None = None, progress=None, *, runtime: str = "auto",
                     precision: str | None = None, cache_dir: str | None = None) -> StudyEvaluation:
    """Patient-level metrics of an exported model on class folders that hold one
    study (DICOM folder, .zip or NIfTI) per patient.

    Each study goes through the path ``predict --study`` runs (the same
    ``Classifier``, options and metadata threshold unless ``threshold``); the CIs
    resample patients (PatientID; a study without one counts as its own patient).
    Studies that get no answer are listed in ``failed`` and in ``studies.csv``,
    never scored silently. The typed record is also written to ``metrics.json``.
    """
    from dataclasses import replace

    from ctedge.core.data import discover
    from ctedge.core.files import check_writable
    from ctedge.edge.runtime import Classifier
    from ctedge.edge.study import STUDY_HINT, StudyOptions, predict_studies

    model_path = Path(model_path)
    if model_path.suffix.lower() != ".onnx":
        raise CtedgeError(f"{model_path}: studies are evaluated with the exported ONNX model that "
                          "`predict --study` runs (`ctedge export MODEL.keras --onnx`), not a .keras file")
    options = replace(options or StudyOptions(), threshold=threshold)  # checks the threshold too
    out = Path(out_dir or model_path.parent / "eval-studies")  # where `report --study` looks
    check_writable(out, "--out", folder=True)
    clf = Classifier(model_path, provider, threads, runtime=runtime, precision=precision, cache_dir=cache_dir,
                     max_pixels=options.max_pixels, hint=STUDY_HINT)
    if positive is None and (Path(data_root) / clf.positive).is_dir():
        positive = clf.positive
    dataset = discover(data_root, positive, studies=True)
    threshold = clf.threshold if threshold is None else threshold
    rows = [(sample.class_name, sample.label, result) for sample in dataset.samples
            for result in predict_studies(clf, [sample.path], options, progress)]
    report = StudyEvaluation(
        model=str(model_path), provider=clf.providers[0], runtime=clf.runtime, precision=clf.precision,
        data=str(data_root), classes=dataset.class_names, options=options.to_dict(),
        **score_studies(rows, threshold, out, resamples, seed, str(data_root)))
    atomic_write(dumps(report).encode(), out / "metrics.json")
    return report


def score_studies(rows: list[tuple[str, int, StudyResult]], threshold: float, out: Path,
                  resamples: int = DEFAULT_RESAMPLES, seed: int = 0, data: str = "") -> dict:
    """Patient-level scores of studies whose truth is known: ``rows`` of (class name, truth
    0/1, result). The CIs resample patients (PatientID; a study without one is its own
    patient; when all share one, studies, with a warning). Studies without an answer are
    ``failed``, never scored. Writes studies.csv and the plots to ``out``; returns the
    shared fields of a ``StudyEvaluation``."""
    from ctedge.edge.study import CSV_FIELDS, csv_row

    scored = [(truth, r) for _, truth, r in rows if r.answered]
    failed = [{"input": r.input, "study_uid": r.study_uid, "error": r.no_answer} for _, _, r in rows if not r.answered]
    if not scored:
        raise CtedgeError(f"none of the {len(rows)} studies in {data} got an answer" +
                          (f" (first: {failed[0]['input']}: {failed[0]['error']})" if failed else ""))
    y = np.array([truth for truth, _ in scored])
    p = np.array([r.probability for _, r in scored])
    patients = np.array([r.patient_id or f"{r.input}#{r.study_uid}" for _, r in scored])
    warnings = []
    if len(scored) > 1 and len(set(patients)) == 1:
        warnings.append(f"all {len(scored)} studies share PatientID {patients[0]!r} (anonymised?): "
                        "the CIs resample studies instead")
        patients = np.array([f"{r.input}#{r.study_uid}" for _, r in scored])
    scores = score(y, p, threshold, patients, resamples, seed)
    plots = plot_scores(y, p, scores["metrics"]["auc"].value, out)
    atomic_write(csv_text(["class", "truth", *CSV_FIELDS],
                          [{"class": name, "truth": truth, **csv_row(r)} for name, truth, r in rows]).encode(),
                 out / "studies.csv")
    return dict(threshold=threshold, studies=len(scored), positive=int(y.sum()), patients=len(set(patients)),
                **scores, shortcut_baseline={}, output_spread=finite(output_spread(p)), failed=failed,
                warnings=warnings, **plots, studies_csv=str(out / "studies.csv"), out_dir=str(out))
