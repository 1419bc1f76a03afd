"""Binary classification metrics with bootstrap CIs (group-aware), calibration.

numpy only at import (scikit-learn inside the functions that need it), so the
TensorFlow-free base install can score ONNX models too.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc")
CONSTANT_SPREAD = 1e-3  # outputs spanning less than this: the AUC only ranks round-off
DEFAULT_THRESHOLD = 0.5  # decision threshold on P(positive) unless one is given or stored
DEFAULT_RESAMPLES = 1000  # bootstrap resamples for the 95% CIs


def output_spread(p) -> float:
    """max - min of a model's outputs (nan for fewer than two)."""
    p = np.asarray(p, float)
    return float(np.ptp(p)) if len(p) > 1 else float("nan")


def constant_message(spread: float, images: int) -> str | None:
    """The one warning for an effectively constant model, or None when its
    outputs on ``images`` images span at least ``CONSTANT_SPREAD``."""
    if not spread < CONSTANT_SPREAD:  # nan (one image) is no evidence either way
        return None
    return (f"the model is effectively constant: its outputs on {images} images span only "
            f"{spread:.1e} (< {CONSTANT_SPREAD:g}), so its AUC and labels rank round-off, not evidence")


def agreement(reference, candidate, threshold: float) -> dict:
    """How far a model variant's outputs are from the reference's on the same images:
    max and mean |Δp| and the share of equal decisions at ``threshold``."""
    reference, candidate = np.asarray(reference, float), np.asarray(candidate, float)
    return {"images": int(len(reference)), "max_abs_diff": float(np.max(np.abs(reference - candidate))),
            "mean_abs_diff": float(np.mean(np.abs(reference - candidate))),
            "decision_agreement": float(np.mean((reference >= threshold) == (candidate >= threshold)))}


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half); nan with one class."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, float)
    positives, negatives = int(y.sum()), int((~y).sum())
    if not positives or not negatives:
        return float("nan")
    _, index, counts = np.unique(p, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[index]  # 1-based, ties share their average rank
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Accuracy, precision, sensitivity (recall), specificity, F1 and ROC AUC."""
    y = np.asarray(y).astype(int)
    predicted = np.asarray(p) >= threshold
    tp = int(np.sum(predicted & (y == 1)))
    tn = int(np.sum(~predicted & (y == 0)))
    fp = int(np.sum(predicted & (y == 0)))
    fn = int(np.sum(~predicted & (y == 1)))

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": ratio(tp + tn, len(y)),
        "precision": precision,
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "auc": roc_auc(y, p),
    }


def confusion(y: np.ndarray, p: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[list[int]]:
    """[[TN, FP], [FN, TP]]."""
    y = np.asarray(y).astype(int)
    predicted = (np.asarray(p) >= threshold).astype(int)
    return [[int(np.sum((y == t) & (predicted == q))) for q in (0, 1)] for t in (0, 1)]


def bootstrap_ci(y: np.ndarray, p: np.ndarray, threshold: float = DEFAULT_THRESHOLD, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0, groups: np.ndarray | None = None, level: float = 0.95
                 ) -> dict[str, tuple[float, float]]:
    """Percentile CIs; resamples whole groups (patients, source figures) when given,
    since slices of one group are not independent."""
    y, p = np.asarray(y), np.asarray(p)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    unique, index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(index == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in METRICS}
    for _ in range(resamples):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))])
        for name, value in point_metrics(y[rows], p[rows], threshold).items():
            draws[name].append(value)
    tail = (1 - level) / 2 * 100
    return {name: tuple(float(v) for v in np.nanpercentile(values, [tail, 100 - tail]))
            if not np.all(np.isnan(values)) else (float("nan"), float("nan"))
            for name, values in draws.items()}


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10):
    """Per-bin mean probability, observed rate and count; expected calibration error."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    confidence = np.bincount(which, weights=p, minlength=bins) / np.maximum(counts, 1)
    observed = np.bincount(which, weights=y, minlength=bins) / np.maximum(counts, 1)
    ece = float(np.sum(counts * np.abs(confidence - observed)) / max(len(y), 1))
    return confidence, observed, counts, ece
