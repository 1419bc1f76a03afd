"""`ctedge demo`: a synthetic CT-like data set (``ctedge.core.phantoms``), a small
training run, an evaluation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ctedge.core.errors import CtedgeError
from ctedge.core.phantom_studies import Anatomy
from ctedge.core.phantoms import WINDOW, make_dataset
from ctedge.core.progress import ProgressFn
from ctedge.core.results import Scores


def run_demo(out: str | Path = "demo", epochs: int = 12, per_class: int = 200,
             backbone: str = "b3", progress: ProgressFn | None = None, eager: bool = False) -> dict:
    """Phantoms -> train (weights none, 64 px, whole network, lr 1e-3, no augmentation:
    from scratch on 128 images it keeps the model from learning in a few epochs)
    -> evaluate on the held-out test part. ``eager``: train without graph tracing."""
    from ctedge.core.data import DataOptions
    from ctedge.core.preprocess import AugmentConfig, PreprocessConfig
    from ctedge.evaluation.evaluate import evaluate
    from ctedge.training.model import ModelConfig
    from ctedge.training.train import TrainConfig, train

    started = time.perf_counter()
    out = Path(out)
    data = make_dataset(out / "data", per_class=per_class)
    run_dir = out / "run"
    train(DataOptions(root=str(data)),
          TrainConfig(epochs=epochs, learning_rate=1e-3, patience=epochs),
          ModelConfig(weights="none", backbone=backbone, units=64, freeze_backbone=False),
          PreprocessConfig(image_size=64, augment=AugmentConfig(rotation_deg=0.0, shift=0.0, horizontal_flip=False, zoom=0.0)),
          run_dir, progress=progress, eager=eager)
    report = evaluate(run_dir / "model.keras", data, split="test", resamples=500, progress=progress)
    verdict, above = against_chance(report, "test")
    return {"data": str(data), "run_dir": str(run_dir), "evaluation": report,
            "verdict": verdict, "above_chance": above, "seconds": time.perf_counter() - started}


def against_chance(report: Scores, what: str) -> tuple[str, bool]:
    """The verdict: is the accuracy's CI above always answering the larger class?"""
    accuracy, count = report.metrics["accuracy"], report.scored
    chance = max(report.positive, count - report.positive) / count
    above = accuracy.ci95[0] > chance
    return (f"{what} accuracy {accuracy.value:.3f} (95% CI {accuracy.ci95[0]:.3f}-"
            f"{accuracy.ci95[1]:.3f}) vs chance {chance:.3f}: "
            + ("well above chance" if above else "NOT clearly above chance")), above


CLASSES = (("CT_NonCOVID", False), ("CT_COVID", True))


def write_patients(root: Path, rng: np.random.Generator, first: int, count: int, slices: int, size: int,
                   zip_every: int = 0) -> list[tuple[str, bool, Path, Anatomy]]:
    """``count`` phantom patients per class as DICOM studies (axial series + scout) in
    ``root/CLASS/PATIENT``, each of its own build, position, noise, slice spacing and
    opacities (``Anatomy.draw``); every ``zip_every``-th as PATIENT.zip (stored, not
    compressed, so file sizes stay equal across classes)."""
    import shutil
    import zipfile

    from ctedge.core.phantom_studies import write_study

    written = []
    for name, positive in CLASSES:
        for i in range(count):
            patient = f"P{first + len(written):04d}"
            folder = root / name / patient
            anatomy = Anatomy.draw(rng)
            write_study(folder, rng, positive, slices, size, patient_id=patient, anatomy=anatomy)
            if zip_every and i % zip_every == zip_every - 1:
                with zipfile.ZipFile(folder.with_suffix(".zip"), "w", zipfile.ZIP_STORED) as archive:
                    for file in sorted(folder.iterdir()):
                        archive.write(file, file.name)
                shutil.rmtree(folder)
                folder = folder.with_suffix(".zip")
            written.append((patient, positive, folder, anatomy))
    return written


def run_study_demo(out: str | Path = "demo-study", epochs: int = 12, patients: int = 32, slices: int = 24,
                   backbone: str = "b3", size: int = 64, seed: int = 0,
                   progress: ProgressFn | None = None, eager: bool = False) -> dict:
    """The whole study path on phantom patients (``patients`` per class, half held out):

    DICOM studies -> the training patients' lung slices as PNG class folders (a
    positive patient's slices where the phantom put ground glass, as a reader marks
    slices; all lung slices of a negative patient) -> train as ``run_demo`` does,
    splitting by patient -> ONNX -> ``predict --study`` on two held-out patients and
    patient-level evaluation on all held-out ones. ``eager``: train without graph tracing."""
    from ctedge.core.data import DataOptions
    from ctedge.core.phantom_studies import opacity_slices
    from ctedge.core.preprocess import AugmentConfig, PreprocessConfig
    from ctedge.edge.runtime import Classifier
    from ctedge.edge.study import STUDY_HINT, StudyOptions, export_slices, find_studies, predict_studies
    from ctedge.evaluation.evaluate import evaluate_studies
    from ctedge.training.export import ExportOptions, export_onnx
    from ctedge.training.model import ModelConfig
    from ctedge.training.train import TrainConfig, train

    for name, value, least in (("patients", patients, 4), ("slices", slices, 8)):
        if value < least:
            raise CtedgeError(f"must be at least {least}, not {value}", param=name)
    started = time.perf_counter()
    seconds = {}
    out = Path(out)
    rng = np.random.default_rng(seed)
    held_out = patients // 2
    training = write_patients(out / "studies" / "train", rng, 0, patients - held_out, slices, size)
    testing = write_patients(out / "studies" / "test", rng, len(training), held_out, slices, size, zip_every=3)
    slice_root = out / "slices"
    for patient, positive, folder, anatomy in training:
        marked = opacity_slices(slices, anatomy.opacity_extent)
        for study in find_studies(folder):
            export_slices(study, slice_root / CLASSES[positive][0], patient, WINDOW,
                          keep=(lambda i, n, marked=marked: bool(marked[i])) if positive else None)
    seconds["write_studies_and_slices"] = time.perf_counter() - started
    run_dir = out / "run"
    train(DataOptions(root=str(slice_root), test_fraction=0.0, val_fraction=0.25, group_regex=r"^(P\d+)_"),
          TrainConfig(epochs=epochs, learning_rate=1e-3, patience=epochs),
          ModelConfig(weights="none", backbone=backbone, units=64, freeze_backbone=False),
          PreprocessConfig(image_size=size, augment=AugmentConfig(rotation_deg=0.0, shift=0.0, horizontal_flip=False,
                                                                 zoom=0.0)),
          run_dir, progress=progress, eager=eager)
    seconds["train"] = time.perf_counter() - started - sum(seconds.values())
    onnx = run_dir / "model.onnx"
    export_onnx(run_dir / "model.keras", onnx, ExportOptions(check_data=str(slice_root), check_count=16))
    seconds["export"] = time.perf_counter() - started - sum(seconds.values())
    examples = [next(f for _, p, f, _ in testing if p == positive) for positive in (True, False)]
    plots = out / "predict-plots"
    results = predict_studies(Classifier(onnx, hint=STUDY_HINT), examples, StudyOptions(keep_thumbnails=True))
    from ctedge.core.plots import study_plot

    predicted = [{**r.to_dict(), "plot": str(study_plot(r, plots))} for r in results]
    report = evaluate_studies(onnx, out / "studies" / "test", out_dir=run_dir / "eval-studies", resamples=500)
    seconds["predict_and_evaluate"] = time.perf_counter() - started - sum(seconds.values())
    verdict, above = against_chance(report, "held-out patients:")
    return {"studies": str(out / "studies"), "slices": str(slice_root), "run_dir": str(run_dir), "onnx": str(onnx),
            "training_patients": len(training), "held_out_patients": len(testing),
            "training_slices": sum(1 for _ in slice_root.rglob("*.png")), "predicted": predicted,
            "plots": str(plots), "evaluation": report, "verdict": verdict, "above_chance": above,
            "stage_seconds": seconds, "seconds": time.perf_counter() - started}
