"""Figures people would rather look at than read (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ctedge.core.files import WriteError, printable, safe_child, safe_name  # noqa: E402


def _save(fig, path: Path, dpi: int = 100) -> Path:
    """Write and close ``fig``; a failed write (disk full) is a ``WriteError`` naming ``path``."""
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as exc:
        raise WriteError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return path


def _finish(fig, ax, path: Path, legend: str = "best") -> Path:
    ax.legend(loc=legend)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def training_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Loss and AUC per epoch, train beside validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "auc")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=prefix + metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, path)


def roc_curve(fpr: np.ndarray, tpr: np.ndarray, auc: float, path: Path,
              baseline: tuple[np.ndarray, np.ndarray, float] | None = None) -> Path:
    """ROC of the model, with the shortcut baseline's when given."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"model (AUC {auc:.3f})")
    if baseline is not None:
        ax.plot(baseline[0], baseline[1], ":", label=f"metadata baseline (AUC {baseline[2]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    return _finish(fig, ax, path, "lower right")


def reliability(bin_confidence: np.ndarray, bin_accuracy: np.ndarray, bin_counts: np.ndarray,
                ece: float, path: Path) -> Path:
    """Reliability diagram: predicted probability against observed frequency."""
    fig, ax = plt.subplots(figsize=(5, 5))
    mask = bin_counts > 0
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.plot(bin_confidence[mask], bin_accuracy[mask], "o-", label=f"model (ECE {ece:.3f})")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed positive rate")
    return _finish(fig, ax, path, "upper left")


def latency_histogram(samples_ms: dict[str, np.ndarray], path: Path) -> Path:
    """Latency distribution per model/provider."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in samples_ms.items():
        ax.hist(values, bins=40, alpha=0.5, label=label)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("runs")
    return _finish(fig, ax, path)


def study_plot_path(patient_id: str | None, study_uid: str | None, folder: Path,
                    taken: Collection[Path] = ()) -> Path:
    """``PATIENT_UIDTAIL.png`` inside ``folder`` (``_2``, ``_3``... after it when ``taken``
    holds it: the same study given twice in one run); both parts come from the study's
    files, so they are sanitised and the name checked to stay in the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tail = safe_name((study_uid or "")[-12:]) if study_uid else "study"
    stem = f"{safe_name(patient_id or 'study', 40)}_{tail}"
    path, copy = safe_child(folder, f"{stem}.png"), 1
    while path in taken:
        copy += 1
        path = safe_child(folder, f"{stem}_{copy}.png")
    return path


def study_plot(result, folder: Path, taken: set[Path] | None = None) -> Path:
    """One study (``ctedge.edge.study.StudyResult``): slice probability against slice
    position with the patient's probability, and the top slices as thumbnails.
    ``taken``: the plots this run wrote so far (the new one is added)."""
    path = study_plot_path(result.patient_id, result.study_uid, folder, taken or ())
    if taken is not None:
        taken.add(path)
    top = result.top_slices
    columns = max(1, len(top))
    fig = plt.figure(figsize=(max(8, 1.6 * columns), 5.5))
    grid = fig.add_gridspec(2, columns, height_ratios=(2.2, 1))
    ax = fig.add_subplot(grid[0, :])
    positions = [s.position_mm for s in result.slices]
    ax.plot(positions, [s.probability for s in result.slices], "o-", ms=3, label="slice")
    ax.plot([s.position_mm for s in top], [s.probability for s in top], "o", color="red",
            label=f"top {len(top)}")
    ax.axhline(result.probability, color="black", ls="--", lw=1,
               label=f"patient {result.probability:.3f} ({result.aggregate}): {result.label}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("slice position along the normal (mm)")
    ax.set_ylabel("P(positive)")
    ax.set_title(printable(f"patient {result.patient_id or '?'}, {result.slices_used} of {result.slices_total} "
                           "slices"), parse_math=False)  # a PatientID is text, never mathtext
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    for column, entry in enumerate(top):
        thumb = fig.add_subplot(grid[1, column])
        image = result.thumbnails.get(entry.index)
        if image is not None:
            thumb.imshow(image, cmap="gray", vmin=0, vmax=255)
        thumb.set_title(f"#{entry.index} {entry.position_mm:.0f} mm\np {entry.probability:.3f}", fontsize=8)
        thumb.axis("off")
    return _save(fig, path, dpi=90)
