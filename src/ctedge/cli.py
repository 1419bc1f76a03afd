"""`ctedge` command line: a thin shell over the library.

TensorFlow is imported only inside the commands that need it, so `predict`
and `bench` run on the base install.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.markup import escape

from . import __version__
from .audit import HASH_THRESHOLD
from .bench import DEFAULT_BUDGET_MS, BenchOptions
from .choices import (
    Aggregate,
    Algorithm,
    Backbone,
    BenchRuntime,
    Clean,
    EvalSplit,
    Objective,
    Precision,
    Provider,
    Role,
    Runtime,
    Split,
)
from .data import DataOptions
from .errors import CtedgeError, ExitCode
from .imageio import DEFAULT_MAX_PIXELS
from .metrics import DEFAULT_RESAMPLES, DEFAULT_THRESHOLD
from .preprocess import AugmentConfig, PreprocessConfig
from .progress import console
from .runconfig import ModelConfig, TrainConfig
from .study import DEFAULT_MAX_SLICES, DEFAULT_TOP_K, StudyOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Put a chest-CT COVID-19 classifier onto edge hardware.\n\n"
                       "Workflow: `ctedge train DATA` (or `ctedge tune DATA`), "
                       "`ctedge export --onnx`, `ctedge bench`.")

# Library parameter -> the flag that sets it, where the two names differ
# (otherwise --name-with-dashes); a library error about a parameter shows the flag.
FLAGS = {"learning_rate": "--lr", "run_dir": "--out", "rotation_deg": "--rotation", "horizontal_flip": "--flip",
         "time_budget_min": "--time-budget", "explain_count": "--explain", "series_uid": "--series",
         "data": "--data", "split_dir": "--split-dir"}


def flag(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


# --- option groups: each defined once, used by every command that takes it ------

# data
DataArg = Annotated[Path, typer.Argument(help="Data folder: one subfolder per class.")]
Positive = Annotated[Optional[str], typer.Option(help="Positive class folder (detected when unset).")]
CleanOpt = Annotated[Clean, typer.Option("--clean", help="Images with coloured annotation marks: drop them, "
                                                        "report them, or off (not looked for).")]
# split
SplitDir = Annotated[Optional[Path], typer.Option(
    help="Folder of official split lists ({train,val,test}_CLASS.txt).")]
GroupRegex = Annotated[Optional[str], typer.Option(
    help="Regex on file names giving the group (patient/source); its first group is used.")]
Seed = Annotated[int, typer.Option(help="Seed for the split, augmentation and initialisation.")]
TestFraction = Annotated[float, typer.Option(help="Test part of a random split.")]
ValFraction = Annotated[float, typer.Option(help="Validation part carved from train.")]
# preprocessing and augmentation
ImageSize = Annotated[int, typer.Option(help="Model input size in pixels (B3 native: 300).")]
WindowLow = Annotated[float, typer.Option(
    help="HU window low end: how DICOM is decoded to gray (8-bit images: no effect).")]
WindowHigh = Annotated[float, typer.Option(help="HU window high end (as --window-low).")]
Centre = Annotated[float, typer.Option(
    help="The paper's zero-centre; recorded, but shifted back before the backbone (no effect).")]
Rotation = Annotated[float, typer.Option(help="Augmentation: max rotation (degrees).")]
Shift = Annotated[float, typer.Option(help="Augmentation: max width/height shift (fraction).")]
Flip = Annotated[bool, typer.Option(help="Augmentation: random horizontal flip.")]
Zoom = Annotated[float, typer.Option(help="Augmentation: max zoom in/out (padding) fraction.")]
# model
Weights = Annotated[str, typer.Option(
    help="Backbone weights: imagenet | none | PATH to efficientnetb3_notop.h5 | a trained ctedge model "
         "(RUN/model.keras or the run folder): its backbone, exactly as trained.")]
BackboneOpt = Annotated[Optional[Backbone], typer.Option(
    "--backbone", help="b3 (EfficientNetB3, the paper's) | tiny (a 1%-compute EfficientNet for tests and smoke "
                       "runs); default: the trained model's with --weights RUN, else b3.")]
Units = Annotated[Optional[int], typer.Option(
    help=f"Width of the head's dense layer (default {ModelConfig.units}; tune: the first trial's, where the "
         "search starts).")]
Dropout = Annotated[Optional[float], typer.Option(
    help=f"Dropout after the dense layer (default {ModelConfig.dropout}; tune: the first trial's).")]
FreezeBackbone = Annotated[Optional[bool], typer.Option(
    "--freeze-backbone/--train-backbone",
    help="Train only the head (default: yes with pretrained weights, no with --weights none).")]
FineTuneBlocks = Annotated[int, typer.Option(
    help="Also train the top N backbone blocks (1-7; tune: trains full models, no feature cache).")]
# training
Epochs = Annotated[int, typer.Option(help="Epochs (train: the paper's 100; tune: per trial, early stopping on "
                                          "the objective; Hyperband: the largest budget).")]
BatchSize = Annotated[int, typer.Option(help="Batch size (paper: 16).")]
LearningRate = Annotated[Optional[float], typer.Option(
    "--lr", help=f"Adam learning rate (default the paper's {TrainConfig.learning_rate}; tune: the first "
                 "trial's).")]
Patience = Annotated[int, typer.Option(help="Early-stopping patience (epochs).")]

JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON ('-' for stdout).")]
HtmlOut = Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML page.")]

# inference (predict, bench)
ProviderOpt = Annotated[Provider, typer.Option(
    "--provider", help="Device. onnxruntime: auto | cpu | cuda | tensorrt (falls back to the CPU with a message); "
                       "openvino: auto | cpu | gpu | npu.")]
Threads = Annotated[Optional[int], typer.Option(help="Inference threads (default: all cores).")]
PrecisionOpt = Annotated[Optional[Precision], typer.Option(
    "--precision", help="OpenVINO: bf16/fp16 are inference precisions of the fp32 model (CPU support "
    "needed), int8 the IR from `export --openvino`; onnxruntime: fp16/int8 run the NAME_fp16/NAME_int8.onnx "
    "files from export. Default: auto's choice, else fp32.")]
CacheDir = Annotated[Optional[Path], typer.Option(
    help="OpenVINO compiled-model cache (default ~/.cache/ctedge/openvino): a second start skips compiling.")]

# whole-study classification (predict --study, evaluate --study)
SeriesOpt = Annotated[Optional[str], typer.Option("--series", help="--study: classify this SeriesInstanceUID.")]
SliceStep = Annotated[Optional[int], typer.Option(
    help="--study: take every Nth slice (default: the smallest step giving at most --max-slices).")]
MaxSlices = Annotated[int, typer.Option(help="--study: slices sampled at most when --slice-step is unset.")]
AggregateOpt = Annotated[Aggregate, typer.Option("--aggregate", help="--study: how slice probabilities become "
                                                                    "the study's.")]
TopK = Annotated[int, typer.Option(help="--study: slices averaged by --aggregate topk.")]


def data_options(data: Path, *, positive: str | None, split_dir: Path | None, group_regex: str | None,
                 seed: int, test_fraction: float, val_fraction: float, clean: Clean = Clean.drop) -> DataOptions:
    """The data and split groups."""
    return DataOptions(root=str(data), split_dir=str(split_dir) if split_dir else None, positive=positive,
                       seed=seed, test_fraction=test_fraction, val_fraction=val_fraction,
                       group_regex=group_regex, clean=clean)


def preprocess_config(*, image_size: int, window_low: float, window_high: float, centre: float,
                      rotation: float, shift: float, flip: bool, zoom: float) -> PreprocessConfig:
    """The preprocessing and augmentation group."""
    return PreprocessConfig(image_size=image_size, window_low=window_low, window_high=window_high, centre=centre,
                            augment=AugmentConfig(rotation_deg=rotation, shift=shift, horizontal_flip=flip,
                                                  zoom=zoom))


def model_config(*, weights: str, backbone: Backbone | None, freeze_backbone: bool | None,
                 fine_tune_blocks: int, units: int | None = None, dropout: float | None = None) -> ModelConfig:
    """The model group; the backbone defaults to a trained model's (``--weights RUN``), else b3."""
    from .model import saved_backbone

    head = {name: value for name, value in (("units", units), ("dropout", dropout)) if value is not None}
    return ModelConfig(weights=weights, backbone=backbone or saved_backbone(weights) or Backbone.b3,
                       freeze_backbone=freeze_backbone, fine_tune_blocks=fine_tune_blocks, **head)


VERBOSE = {"on": False}  # set by the --verbose option before a command runs


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)])
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)


def _terminated(signum, frame) -> None:
    """SIGTERM (kill, a job scheduler) as Ctrl-C: temp files are removed on the way out."""
    raise KeyboardInterrupt


def command(func=None, *, tensorflow: bool = False):
    """Register a command: clear message and exit code for user errors, never a
    traceback. ``tensorflow=True``: import TensorFlow first, quietly."""
    if func is None:
        return functools.partial(command, tensorflow=tensorflow)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _setup_logging()
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
        try:
            if tensorflow:
                from .quiet import import_tensorflow
                import_tensorflow(VERBOSE["on"])
            return func(*args, **kwargs)
        except CtedgeError as exc:
            message = exc.with_name(flag(exc.param)) if exc.param else str(exc)
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return app.command()(wrapper)


def check_outputs(*outputs: tuple[Path | None, str] | tuple[Path | None, str, bool]) -> None:
    """(path, option[, is_folder]) for each output: refuse one that can't be written
    (exit 2 naming it) before any model or data is loaded; unset ones pass."""
    from .files import check_writable

    for path, what, *folder in outputs:
        if path is not None:
            check_writable(path, what, bool(folder and folder[0]))


def write_text(text: str, path: Path | None) -> None:
    """To stdout for '-', else atomically (never a half-written file)."""
    from .files import atomic_write

    if path is None:
        return
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        atomic_write(text.encode(), path)


def write_json(result: dict, path: Path | None) -> None:
    write_text(json.dumps(result, indent=2, default=str) + "\n", path)


def write_csv(records: list[dict], fields: list[str], path: Path | None) -> None:
    from .files import csv_text

    write_text(csv_text(fields, records), path)


def print_file_rows(title: str, rows: list, third: str) -> int:
    """Table of per-file results (path, probability, ``third`` attribute), errors
    in red; returns how many files failed."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("path", "probability", third):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.path, "" if row.error else f"{row.probability:.4f}",
                      f"[red]error: {row.error}[/]" if row.error else getattr(row, third))
    console.print(table)
    return sum(row.error is not None for row in rows)


def warn_if_constant(spread: float | None, images: int) -> str | None:
    """Print the constant-model warning when it applies; returns it."""
    from .metrics import constant_message

    message = constant_message(float("nan") if spread is None else spread, images)
    if message:
        console.print(f"[bold red]warning:[/] {message}", highlight=False)
    return message


def exit_if_failed(failed: int, total: int) -> None:
    if failed:
        console.print(f"[yellow]{failed} of {total} file(s) could not be read[/]")
        raise typer.Exit(ExitCode.FAILED)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctedge {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", help="Show TensorFlow's own start-up "
                                               "and C++ log lines (hidden by default).")] = False,
         max_pixels: Annotated[int, typer.Option(
             envvar="CTEDGE_MAX_PIXELS", help="Refuse images of more pixels than this, read from the "
             "file header before decoding (every command).")] = DEFAULT_MAX_PIXELS) -> None:
    """Put a chest-CT COVID-19 classifier onto edge hardware."""
    from .imageio import set_max_pixels

    VERBOSE["on"] = verbose
    try:
        set_max_pixels(max_pixels)
    except CtedgeError as exc:
        raise typer.BadParameter(exc.detail, param_hint=flag(exc.param)) from None


@command(tensorflow=True)
def train(
    data: DataArg,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default runs/train-TIME).")] = None,
    positive: Positive = None,
    clean: CleanOpt = Clean.drop,
    split_dir: SplitDir = None,
    group_regex: GroupRegex = None,
    seed: Seed = DataOptions.seed,
    test_fraction: TestFraction = DataOptions.test_fraction,
    val_fraction: ValFraction = DataOptions.val_fraction,
    image_size: ImageSize = PreprocessConfig.image_size,
    window_low: WindowLow = PreprocessConfig.window_low,
    window_high: WindowHigh = PreprocessConfig.window_high,
    centre: Centre = PreprocessConfig.centre,
    rotation: Rotation = AugmentConfig.rotation_deg,
    shift: Shift = AugmentConfig.shift,
    flip: Flip = AugmentConfig.horizontal_flip,
    zoom: Zoom = AugmentConfig.zoom,
    weights: Weights = ModelConfig.weights,
    backbone: BackboneOpt = None,
    units: Units = None,
    dropout: Dropout = None,
    freeze_backbone: FreezeBackbone = None,
    fine_tune_blocks: FineTuneBlocks = ModelConfig.fine_tune_blocks,
    epochs: Epochs = TrainConfig.epochs,
    batch_size: BatchSize = TrainConfig.batch_size,
    learning_rate: LearningRate = None,
    patience: Patience = TrainConfig.patience,
    early_stopping: Annotated[bool, typer.Option(help="Stop when validation AUC stops improving.")] = True,
    checkpoint_best: Annotated[bool, typer.Option(help="Keep the epoch with the best validation AUC.")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its "
                                         "last finished epoch (same options; --epochs may grow).")] = False,
    json_out: JsonOut = None,
) -> None:
    """Train EfficientNetB3 + the paper's head on a data folder.

    Example: `ctedge train ../shared/data/covid-ct --split-dir ../shared/data/covid-ct/splits
    --weights none --image-size 128 --epochs 3`

    Killed or interrupted? Rerun the same command with `--resume` (and the same `-o`).
    """
    from .train import default_run_dir
    from .train import train as run_training

    run_dir = out if (out or resume) else default_run_dir()
    check_outputs((run_dir, "--out", True), (json_out, "--json"))
    summary = run_training(
        data_options(data, positive=positive, clean=clean, split_dir=split_dir, group_regex=group_regex,
                     seed=seed, test_fraction=test_fraction, val_fraction=val_fraction),
        TrainConfig(epochs=epochs, batch_size=batch_size, early_stopping=early_stopping, patience=patience,
                    checkpoint_best=checkpoint_best, seed=seed,
                    **({} if learning_rate is None else {"learning_rate": learning_rate})),
        model_config(weights=weights, backbone=backbone, units=units, dropout=dropout,
                     freeze_backbone=freeze_backbone, fine_tune_blocks=fine_tune_blocks),
        preprocess_config(image_size=image_size, window_low=window_low, window_high=window_high, centre=centre,
                          rotation=rotation, shift=shift, flip=flip, zoom=zoom),
        run_dir, resume)
    result = summary["result"]
    for name, part in summary["splits"].items():
        if part["unreadable"]:
            console.print(f"[yellow]{name}: skipped {len(part['unreadable'])} unreadable file(s):[/]")
            for item in part["unreadable"]:
                console.print(f"  {item['path']}: {item['reason']}", highlight=False, markup=False)
        if part["dropped"]:
            console.print(f"{name}: dropped {len(part['dropped'])} image(s) with annotation marks")
    best = {k: v for k, v in result.items() if k.startswith("best_")}
    console.print(f"[green]trained[/] {result['epochs_run']} epoch(s) in {result['seconds']:.0f} s, "
                  f"{result['images_per_s']:.1f} images/s, "
                  + ", ".join(f"{k} {v:.4f}" for k, v in best.items()))
    console.print(f"run folder: {run_dir} (model.keras, config.json, history.csv, "
                  "training_curves.png, tensorboard/)")
    write_json(summary, json_out)


def print_metrics(report: dict) -> None:
    """Metric table with CIs, confusion matrix and operating points."""
    from rich.table import Table

    if report.get("unit") == "study":
        title = (f"{report['studies']} studies of {report['patients']} patients ({report['positive']} "
                 f"positive), threshold {report['threshold']}, CIs resampled by patient")
    else:
        title = f"{report['split']} split: {report['images']} images ({report['positive']} positive), " \
                f"threshold {report['threshold']}"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    for name, entry in report["metrics"].items():
        lo, hi = entry["ci95"]
        table.add_row(name, f"{entry['value']:.3f}", f"{lo:.3f} - {hi:.3f}")
    console.print(table)
    (tn, fp), (fn, tp) = report["confusion"]
    console.print(f"confusion: TN {tn}  FP {fp}  FN {fn}  TP {tp};  ECE {report['ece']:.3f}")
    for name, value in report["operating_points"].items():
        console.print(f"  {name.replace('_', ' ')}: {value:.3f}")
    warn_if_constant(report.get("output_spread"), report.get("images", report.get("studies")))
    for name, drift in (report.get("split_drift") or {}).items():
        from .evaluate import drift_warning

        console.print(f"[bold red]warning:[/] {escape(drift_warning(name, drift))}", highlight=False)
    baseline = report.get("shortcut_baseline") or {}
    if "auc" in baseline:
        console.print(f"shortcut baseline (file metadata only, trained on train): AUC {baseline['auc']:.3f} "
                      f"beside the model's {report['metrics']['auc']['value']:.3f}")


@command
def evaluate(
    model: Annotated[Path, typer.Argument(help="Trained model (.keras); with --study the exported .onnx.")],
    data: DataArg,
    split: Annotated[EvalSplit, typer.Option(help="Part of the data to score.")] = EvalSplit.val,
    threshold: Annotated[Optional[float], typer.Option(
        help=f"Decision threshold on P(positive) (default {DEFAULT_THRESHOLD}; with --study the model's metadata "
             "threshold).")] = None,
    split_dir: SplitDir = None,
    group_regex: GroupRegex = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")] = DEFAULT_RESAMPLES,
    external: Annotated[bool, typer.Option(
        "--external", help="DATA is a separate test set: score every readable image in it "
                           "(automatic when no file there is one the model trained on).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default beside the model).")] = None,
    json_out: JsonOut = None,
    html_out: HtmlOut = None,
    study: Annotated[bool, typer.Option("--study", help="DATA's class folders hold one study (DICOM folder, .zip "
                                        "or NIfTI) per patient: patient-level metrics of an exported .onnx "
                                        "model, CIs resampled by patient.")] = False,
    positive: Positive = None,
    series: SeriesOpt = None,
    slice_step: SliceStep = None,
    max_slices: MaxSlices = DEFAULT_MAX_SLICES,
    aggregate: AggregateOpt = Aggregate.topk,
    top_k: TopK = DEFAULT_TOP_K,
) -> None:
    """Accuracy, precision, sensitivity, specificity, F1 and AUC with bootstrap 95% CIs,
    confusion matrix, ROC and calibration plots.

    The split settings of the training run (config.json beside the model) are
    reused, so `val` means the same images (checked against the file hashes recorded
    at training; `--group-regex` groups the bootstrap only). On another data set
    every readable image is scored. Example:
    `ctedge evaluate runs/train-X/model.keras ../shared/data/covid-ct --split val`

    With `--study`, one answer per patient as `predict --study` gives it, scored
    against the class folder; `--split` does not apply (every study is scored):
    `ctedge evaluate exports/b3.onnx held-out-studies/ --study`
    """
    default_out = model.parent / ("eval-studies" if study else f"eval-{split}")
    check_outputs((out or default_out, "--out", True), (json_out, "--json"), (html_out, "--html"))
    if study:
        report = evaluate_studies_command(model, data, threshold, out, resamples, positive, StudyOptions(
            series_uid=series, slice_step=slice_step, max_slices=max_slices, aggregate=aggregate, top_k=top_k))
    else:
        if model.suffix.lower() == ".onnx":
            raise CtedgeError(f"{model}: an .onnx model is evaluated on whole studies (--study, class folders "
                              "of studies); image-level evaluation takes the trained .keras model")
        from .evaluate import evaluate as run_evaluation
        from .quiet import import_tensorflow

        import_tensorflow(VERBOSE["on"])
        report = run_evaluation(model, data, split, DEFAULT_THRESHOLD if threshold is None else threshold, out, resamples,
                                split_dir=str(split_dir) if split_dir else None, group_regex=group_regex,
                                external=external, positive=positive)
        if report["external"]:
            console.print(f"{data} is not the training data: scored every readable image there "
                          f"({report['images']}), no split, no shortcut baseline (no training set to fit it on)",
                          highlight=False, markup=False)
        print_metrics(report)
        console.print(f"plots and metrics.json in {report['out_dir']}")
    write_json(report, json_out)
    if html_out:
        from .report import evaluation_section, verdict, write_page

        write_page(html_out, f"ctedge evaluation: {model}", [verdict(report, None), evaluation_section(report)],
                   f"data {data}")
        console.print(f"HTML page: {html_out}")
    if report.get("failed"):
        raise typer.Exit(ExitCode.FAILED)


def evaluate_studies_command(model: Path, data: Path, threshold: float | None, out: Path | None,
                             resamples: int, positive: str | None, options: StudyOptions) -> dict:
    """`evaluate --study`: patient-level metrics; failed studies named (exit 1 after the outputs)."""
    import importlib.util

    missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise CtedgeError(f"evaluate needs {' and '.join(missing)} (not TensorFlow): pip install 'ctedge[train]'")
    from .evaluate import evaluate_studies

    report = evaluate_studies(model, data, threshold, out, resamples, positive=positive, options=options,
                              progress=lambda r: console.print(
                                  f"{escape(r.input)}: " + (f"{r.probability:.3f}" if r.error is None
                                                            else f"[red]no answer[/] ({escape(r.error)})"),
                                  highlight=False))
    print_metrics(report)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if report["failed"]:
        console.print(f"[yellow]{len(report['failed'])} of {report['studies'] + len(report['failed'])} "
                      "stud(ies) got no answer and are not in the metrics:[/]")
        for item in report["failed"]:
            console.print(f"  {item['input']}: {item['error']}", highlight=False, markup=False)
    console.print(f"plots, metrics.json and studies.csv in {report['out_dir']}", markup=False)
    return report


@command(tensorflow=True)
def demo(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the data, run and report "
                                                "(default demo/, with --study demo-study/).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default 12, with --study 8).")] = None,
    per_class: Annotated[int, typer.Option(help="Phantoms per class.")] = 200,
    backbone: Annotated[Backbone, typer.Option(help="b3 (the paper's) | tiny (for smoke runs).")] = Backbone.b3,
    json_out: JsonOut = None,
    study: Annotated[bool, typer.Option("--study", help="Whole-study path instead: phantom DICOM patients, "
                                        "train on the training patients' slices, export to ONNX, "
                                        "predict --study and patient-level evaluation on held-out patients.")] = False,
    patients: Annotated[int, typer.Option(help="--study: phantom patients per class, half held out.")] = 32,
    slices: Annotated[int, typer.Option(help="--study: slices per axial series (64x64 px).")] = 24,
) -> None:
    """Generate synthetic CT-like phantoms, train a small model (weights none, 64 px),
    evaluate it on held-out phantoms. Runs in a few minutes on a 2-core CPU.
    Example: `ctedge demo -o demo` (a smoke run: `ctedge demo --backbone tiny --epochs 1`)

    `ctedge demo --study` does it for whole CT studies (see README, "Whole CT studies"):
    `ctedge demo --study` then `ctedge report demo-study/run --study --data demo-study/studies/test`
    """
    check_outputs((out or Path("demo-study" if study else "demo"), "--out", True), (json_out, "--json"))
    if study:
        from .demo import run_study_demo

        report = run_study_demo(out or Path("demo-study"), epochs or 8, patients, slices, backbone)
        for r in report["predicted"]:
            console.print(f"predict --study {r['input']}: P = {r['probability']:.3f} ({r['label']}), "
                          f"{r['slices_used']} of {r['slices_total']} slices classified; plot {r['plot']}",
                          highlight=False, markup=False)
        print_metrics(report["evaluation"])
        console.print(report["verdict"])
        onnx, evaluation = report["onnx"], report["evaluation"]
        console.print(f"studies: {report['studies']} (train/, test/: {report['held_out_patients']} held-out "
                      f"patients)\nslices:  {report['slices']} ({report['training_slices']} PNGs of "
                      f"{report['training_patients']} training patients)\nrun:     {report['run_dir']} "
                      f"(model.keras, model.onnx)\npatient-level evaluation: {evaluation['out_dir']}\n"
                      f"took {report['seconds']:.0f} s ("
                      + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in report["stage_seconds"].items())
                      + f")\nagain by hand: ctedge predict {onnx} {report['studies']}/test/CT_COVID/* --study; "
                      f"ctedge evaluate {onnx} {report['studies']}/test --study; "
                      f"ctedge report {report['run_dir']} --study --data {report['studies']}/test",
                      highlight=False, markup=False)
        write_json(report, json_out)
        return
    from .demo import run_demo

    report = run_demo(out or Path("demo"), epochs or 12, per_class, backbone)
    print_metrics(report["evaluation"])
    console.print(report["verdict"])
    console.print(f"data: {report['data']}\nrun:  {report['run_dir']}\n"
                  f"took {report['seconds']:.0f} s")
    write_json(report, json_out)


@command(tensorflow=True)
def export(
    model: Annotated[Optional[Path], typer.Argument(
        help="Trained .keras model (default: best model of the newest tuning/ project).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Export to ONNX (the only format so far).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output .onnx (default exports/NAME.onnx).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an FP16 variant (NAME_fp16.onnx).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write a static INT8 QDQ variant (NAME_int8.onnx).")] = False,
    calibration_data: Annotated[Optional[Path], typer.Option(help="Images for INT8 calibration.")] = None,
    check_data: Annotated[Optional[Path], typer.Option(
        help="Real images for the parity check (labelled class folders also give AUC); default: generated.")] = None,
    check_count: Annotated[int, typer.Option(help="Images in the parity check.")] = 32,
    threshold: Annotated[float, typer.Option(help="Decision threshold stored in the metadata.")] = DEFAULT_THRESHOLD,
    tolerance: Annotated[float, typer.Option(help="fp32 parity: max |Keras - ONNX|.")] = 1e-4,
    fp16_tolerance: Annotated[float, typer.Option(help="FP16 variant: max |Δp| before it is flagged.")] = 1e-2,
    int8_tolerance: Annotated[float, typer.Option(help="INT8 variant: max |Δp| before it is flagged.")] = 0.05,
    openvino: Annotated[bool, typer.Option(
        "--openvino", help="Also write OpenVINO IR (NAME_ov.xml, gated like the ONNX file; its BF16 run checked "
                           "when the CPU has BF16) and an NNCF INT8 IR (NAME_ov_int8.xml); needs --calibration-data.")] = False,
    allow_constant: Annotated[bool, typer.Option(
        "--allow-constant", help="Export even a model whose outputs on the check images span < 1e-3 "
                                 "(refused by default, exit 3).")] = False,
    json_out: JsonOut = None,
) -> None:
    """Export a trained model to ONNX with preprocessing inside, metadata, a parity gate
    against Keras, and optional FP16/INT8 variants, each with a model card (NAME.json).

    Example: `ctedge export runs/b3-128/model.keras --onnx --fp16 --int8 --openvino
    --calibration-data ../shared/data/covid-ct --check-data ../shared/data/covid-ct`
    """
    from .export import ExportOptions, default_output, export_onnx, latest_model

    if not (onnx or openvino):
        raise CtedgeError("say which format: --onnx and/or --openvino (which converts the verified ONNX file)")
    if model is None:
        model = latest_model()
        console.print(f"exporting {model} (newest model found)")
    check_outputs((output or default_output(model), "--output"), (json_out, "--json"))
    report = export_onnx(model, output, ExportOptions(
        opset=opset, fp16=fp16, int8=int8,
        calibration_data=str(calibration_data) if calibration_data else None,
        check_data=str(check_data) if check_data else None, check_count=check_count,
        threshold=threshold, tolerance=tolerance, fp16_tolerance=fp16_tolerance,
        int8_tolerance=int8_tolerance, openvino=openvino, allow_constant=allow_constant))
    from rich.table import Table

    table = Table(title=f"ONNX export of {report['model']}")
    for column in ("variant", "file", "MB", "max |Δp|", "agree", "AUC Δ", "status"):
        table.add_column(column)
    flagged = False
    for name, card in report["variants"].items():
        check = card["parity"]
        flagged |= check["status"] != "ok"
        auc = f"{check['auc_change']:+.4f}" if "auc_change" in check else "-"
        table.add_row(name, Path(card["file"]).name, f"{card['size_mb']:.1f}", f"{check['max_abs_diff']:.2e}",
                      f"{check['decision_agreement']:.3f}", auc,
                      "ok" if check["status"] == "ok" else "[red]FLAGGED[/]")
    console.print(table)
    spread = report["output_spread"]
    console.print(f"parity on {spread['check_data']}, where the model's outputs span {spread['value']:.3g}; "
                  f"files and model cards (.json) in {Path(report['output']).parent}")
    warn_if_constant(spread["value"], spread["images"])
    write_json(report, json_out)
    if flagged:
        from .export import FLAGGED_MESSAGE

        console.print(f"[bold red]{FLAGGED_MESSAGE}[/]")
        raise typer.Exit(ExitCode.FAILED)


@command(tensorflow=True)
def tune(
    data: DataArg,
    positive: Positive = None,
    clean: CleanOpt = Clean.drop,
    split_dir: SplitDir = None,
    group_regex: GroupRegex = None,
    seed: Seed = DataOptions.seed,
    test_fraction: TestFraction = DataOptions.test_fraction,
    val_fraction: ValFraction = DataOptions.val_fraction,
    image_size: ImageSize = PreprocessConfig.image_size,
    window_low: WindowLow = PreprocessConfig.window_low,
    window_high: WindowHigh = PreprocessConfig.window_high,
    centre: Centre = PreprocessConfig.centre,
    rotation: Rotation = AugmentConfig.rotation_deg,
    shift: Shift = AugmentConfig.shift,
    flip: Flip = AugmentConfig.horizontal_flip,
    zoom: Zoom = AugmentConfig.zoom,
    weights: Weights = ModelConfig.weights,
    backbone: BackboneOpt = None,
    units: Units = None,
    dropout: Dropout = None,
    freeze_backbone: FreezeBackbone = None,
    fine_tune_blocks: FineTuneBlocks = ModelConfig.fine_tune_blocks,
    epochs: Epochs = 20,
    batch_size: BatchSize = TrainConfig.batch_size,
    learning_rate: LearningRate = None,
    patience: Patience = 5,
    algorithm: Annotated[Algorithm, typer.Option(help="Keras Tuner search algorithm.")] = Algorithm.random,
    max_trials: Annotated[int, typer.Option(
        help="Trials to run (the paper's defaults are the first); caps Hyperband's brackets.")] = 10,
    time_budget: Annotated[Optional[float], typer.Option(help="Start no new trial after MIN minutes.")] = None,
    objective: Annotated[Objective, typer.Option(help="What the search maximises (val_loss: minimises).")
                         ] = Objective.val_auc,
    directory: Annotated[Path, typer.Option(help="Keras Tuner project root.")] = Path("tuning"),
    project: Annotated[Optional[str], typer.Option(help="Project name (default DATA-SIZE).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the project over.")] = False,
    views: Annotated[int, typer.Option(help="Augmented views per training image in the feature cache.")] = 4,
    fine_tune: Annotated[bool, typer.Option("--fine-tune", help="Train full models (no feature cache).")] = False,
    cache: Annotated[bool, typer.Option(help="Tune the head on cached backbone features (--no-cache: "
                                             "recompute the backbone every epoch).")] = True,
    search_space: Annotated[Optional[Path], typer.Option(help="YAML/JSON search space (see tuning/*.example.*).")] = None,
    role: Annotated[Optional[Role], typer.Option(help="Distributed: this machine's part (Keras Tuner's engine).")
                    ] = None,
    oracle: Annotated[Optional[str], typer.Option(help="Distributed: the chief's HOST:PORT.")] = None,
    tuner_id: Annotated[Optional[str], typer.Option(help="Distributed: this worker's id.")] = None,
    json_out: JsonOut = None,
) -> None:
    """Search head width, learning rate and dropout around the paper's defaults with
    Keras Tuner; resumable (rerun the same command), fast on cached backbone features.
    Takes train's data, split, preprocessing, augmentation, model and training
    options; `--units`, `--dropout` and `--lr` set the first trial's values.

    Example (heads on the backbone of a model trained here, e.g. by `ctedge train --weights none`):
    `ctedge tune ../shared/data/covid-ct --split-dir ../shared/data/covid-ct/splits
    --weights runs/b3-128/model.keras --image-size 128 --max-trials 10 --epochs 20`

    Distributed: `ctedge tune DATA --role chief --oracle 0.0.0.0:8000` on one machine,
    `ctedge tune DATA --role worker --oracle CHIEF:8000` on each other, one shared --directory.
    """
    from dataclasses import replace

    from rich.table import Table

    from .tuning import SearchSpace, TuneOptions, set_distributed
    from .tuning import tune as run_tuning

    check_outputs((directory, "--directory", True), (json_out, "--json"))
    set_distributed(role, oracle, tuner_id)
    space = SearchSpace.from_file(search_space) if search_space else SearchSpace()
    first = {name: value for name, value in (("default_units", units), ("default_lr", learning_rate),
                                             ("default_dropout", dropout)) if value is not None}
    summary = run_tuning(
        data_options(data, positive=positive, clean=clean, split_dir=split_dir, group_regex=group_regex,
                     seed=seed, test_fraction=test_fraction, val_fraction=val_fraction),
        model_config(weights=weights, backbone=backbone, fine_tune_blocks=fine_tune_blocks,
                     freeze_backbone=False if fine_tune else freeze_backbone),
        preprocess_config(image_size=image_size, window_low=window_low, window_high=window_high, centre=centre,
                          rotation=rotation, shift=shift, flip=flip, zoom=zoom),
        TuneOptions(algorithm=algorithm, max_trials=max_trials, epochs=epochs, time_budget_min=time_budget,
                    objective=objective, directory=str(directory), project=project, overwrite=overwrite,
                    views=views, fine_tune=fine_tune, cache=cache, batch_size=batch_size, patience=patience,
                    seed=seed),
        replace(space, **first))
    if summary.get("role") == "worker":
        console.print(f"worker {summary['tuner_id']} ran trial(s) {', '.join(summary['trials_run']) or 'none'}; "
                      f"the chief writes {summary['project']}/summary.json")
        write_json(summary, json_out)
        return
    table = Table(title=f"{summary['project']}: {len(summary['trials'])} trial(s), {summary['mode']} mode")
    for column in ("trial", "units", "lr", "dropout", "epochs", objective, "best epoch", "seconds", "status"):
        table.add_column(column, justify="right")
    for r in summary["trials"]:
        epochs_run = (f"{r['initial_epoch']}->{r['epochs']} from {r['parent']}" if r["parent"]
                      else str(r["epochs"]))
        table.add_row(r["trial"], str(r["units"]), f"{r['learning_rate']:.2e}", f"{r['dropout']:.1f}", epochs_run,
                      "" if r["score"] is None else f"{r['score']:.4f}", str(r["best_epoch"] or ""),
                      "" if r["seconds"] is None else f"{r['seconds']:.1f}", r["status"])
    console.print(table)
    console.print(f"best: {summary['best_hyperparameters']} ({objective} {summary['best_score']:.4f})")
    console.print(f"best model: {summary['best_model']} ({summary['best_model_source']})")
    write_json(summary, json_out)


@command
def audit(
    data: DataArg,
    positive: Positive = None,
    split_dir: SplitDir = None,
    group_regex: GroupRegex = None,
    seed: Seed = DataOptions.seed,
    test_fraction: TestFraction = DataOptions.test_fraction,
    val_fraction: ValFraction = DataOptions.val_fraction,
    image_size: ImageSize = PreprocessConfig.image_size,
    threshold: Annotated[int, typer.Option(help="Near-duplicate candidates: max differing bits of 64 (pHash).")
                         ] = HASH_THRESHOLD,
    show: Annotated[int, typer.Option(help="Rows of each list to print.")] = 10,
    json_out: JsonOut = None,
    html_out: HtmlOut = None,
) -> None:
    """Find leakage and shortcuts: near-duplicates within/across splits, annotated
    images, a metadata-only shortcut baseline, class balance, unreadable/small images.

    Exit code 0 when clean, 4 (LEAKAGE) when images are duplicated across splits,
    so CI can gate on it. Example:
    `ctedge audit ../shared/data/covid-ct --split-dir ../shared/data/covid-ct/splits`
    """
    from .audit import LEAKAGE_MESSAGE, shortcut_finding
    from .audit import audit as run_audit

    check_outputs((json_out, "--json"), (html_out, "--html"))
    report = run_audit(data_options(data, positive=positive, split_dir=split_dir, group_regex=group_regex, seed=seed,
                                    test_fraction=test_fraction, val_fraction=val_fraction), image_size, threshold)
    for split, b in report["balance"].items():
        if b["images"]:
            console.print(f"{split}: {b['images']} images, {b['positive']} positive "
                          f"({b['positive'] / b['images']:.0%})")
    pairs = report["near_duplicates"]
    console.print(f"[bold]near-duplicates[/] (≤ {threshold} bits): {len(pairs)} pair(s), "
                  f"{report['cross_split_duplicates']} across splits")
    for p in pairs[:show]:
        tag = "[red]CROSS-SPLIT[/]" if p["cross_split"] else "within " + p["splits"][0]
        console.print(f"  {tag} {p['bits']:2d} bits  {escape(p['a'])}  ~  {escape(p['b'])}", highlight=False)
    console.print(f"[bold]annotated[/] (coloured marks): {len(report['annotated'])}")
    for path in report["annotated"][:show]:
        console.print(f"  {path}", highlight=False, markup=False)
    console.print(f"smaller than {image_size} px: {len(report['too_small'])}; unreadable: {len(report['unreadable'])}")
    for item in report["unreadable"][:show]:
        console.print(f"  {item['path']}: {item['reason']}", highlight=False, markup=False)
    baseline = report["shortcut_baseline"]
    for split in ("val", "test"):
        if split in baseline:
            loud, finding = shortcut_finding(split, baseline[split])
            console.print(f"[bold red]{escape(finding)}[/]" if loud else escape(finding), highlight=False)
    write_json(report, json_out)
    if html_out:
        from .report import audit_section, verdict, write_page

        write_page(html_out, f"ctedge audit: {data}", [verdict(None, report), audit_section(report)],
                   f"split lists {split_dir}" if split_dir else "random split, seed " + str(seed))
        console.print(f"HTML page: {html_out}")
    if report["leakage"]:
        console.print(f"[bold red]{LEAKAGE_MESSAGE}[/]")
        raise typer.Exit(ExitCode.LEAKAGE)



@command(tensorflow=True)
def explain(
    model: Annotated[Path, typer.Argument(help="Trained model (.keras): Grad-CAM needs its gradients.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the overlays.")] = Path("explained"),
    threshold: Annotated[float, typer.Option(help="Decision threshold written on each overlay.")
                         ] = DEFAULT_THRESHOLD,
    alpha: Annotated[float, typer.Option(help="Heatmap opacity at its hottest (0-1).")] = 0.5,
    sheet: Annotated[bool, typer.Option(help="Also write contact_sheet.png (the first 48 images) when there are several.")] = True,
    json_out: JsonOut = None,
) -> None:
    """Grad-CAM heatmaps for the positive class: where in each image the model
    found its evidence. Writes NAME.gradcam.png (the image, the heatmap over it
    and the probability above it) and a contact sheet.

    A file that can't be read gets an error row and the rest go on; exit code 1
    if any failed. Example:
    `ctedge explain runs/train-X/model.keras ../shared/data/covid-ct/CT_COVID --out explained`
    """
    from .explain import check
    from .explain import explain as run_explain
    from .imageio import expand_paths
    from .runconfig import RunConfig

    check(model, alpha)
    files = expand_paths(paths)
    if not files:
        raise CtedgeError(f"no image files found in {', '.join(map(str, paths))}")
    check_outputs((out, "--out", True), (json_out, "--json"))
    config = RunConfig.load(model)
    positive = (config.positive if config else None) or "positive"
    report = run_explain(model, files, out, threshold, positive, alpha, sheet=sheet)
    rows = report["explanations"]
    failed = print_file_rows(f"Grad-CAM for P({positive}), threshold {threshold}", rows, "overlay")
    if report["contact_sheet"]:
        console.print(f"contact sheet: {report['contact_sheet']}")
    write_json({**report, "explanations": [row.to_dict() for row in rows]}, json_out)
    exit_if_failed(failed, len(rows))


@command(tensorflow=True)
def report(
    run_dir: Annotated[Path, typer.Argument(
        help="Training run folder (model.keras + config.json) or tuning project (best_model.keras).")],
    data: Annotated[Optional[Path], typer.Option(help="Data folder (default: the one the run trained on).")] = None,
    split: Annotated[EvalSplit, typer.Option(help="Split to evaluate.")] = EvalSplit.val,
    explain_count: Annotated[int, typer.Option("--explain", help="Images to explain with Grad-CAM (0: none).")] = 12,
    run_audit: Annotated[bool, typer.Option("--audit/--no-audit", help="Include the data audit.")] = True,
    fresh: Annotated[bool, typer.Option(help="Recompute the evaluation and audit even if the run folder has them.")] = False,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")] = DEFAULT_RESAMPLES,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="HTML file (default RUN_DIR/report.html).")] = None,
    json_out: JsonOut = None,
    study: Annotated[bool, typer.Option("--study", help="--data holds class folders of studies: patient-level "
                                        "evaluation of the exported model (see evaluate --study).")] = False,
    onnx: Annotated[Optional[Path], typer.Option(help="--study: the exported model (default RUN_DIR/model.onnx).")] = None,
) -> None:
    """One self-contained HTML page for a training run or tuning project: data summary, audit
    findings, metrics with CIs, ROC (with the metadata shortcut's), confusion
    matrix, calibration and a grid of Grad-CAM explained images.

    Runs the evaluation, audit and Grad-CAM it needs, reusing eval-SPLIT/ and
    audit.json when the run folder already has them. Example:
    `ctedge report runs/train-X` then open runs/train-X/report.html;
    for patients: `ctedge report demo-study/run --study --data demo-study/studies/test`
    """
    from .report import build

    check_outputs((out or run_dir / "report.html", "--out"), (json_out, "--json"))
    result = build(run_dir, data, split, explain_count, run_audit, out, resamples, fresh, study, onnx)
    print_metrics(result["evaluation"])
    audit = result["audit"]
    if audit:
        console.print(f"audit: {len(audit['near_duplicates'])} near-duplicate pair(s), "
                      f"{audit['cross_split_duplicates']} across splits; {len(audit['annotated'])} annotated")
    console.print(f"[green]report:[/] {escape(str(result['report']))}")
    write_json(result, json_out)

@command
def predict(
    model: Annotated[Path, typer.Argument(help="Exported .onnx model (or OpenVINO IR .xml).")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    batch_size: Annotated[int, typer.Option(help="Images per inference call.")] = StudyOptions.batch_size,
    runtime: Annotated[Runtime, typer.Option(
        help="Engine; auto: what `ctedge bench --runtime all` found fastest here, saved beside the model, "
             "else onnxruntime.")] = Runtime.auto,
    precision: PrecisionOpt = None,
    provider: ProviderOpt = Provider.auto,
    threads: Threads = None,
    cache_dir: CacheDir = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write rows as CSV ('-' for stdout).")] = None,
    json_out: JsonOut = None,
    study: Annotated[bool, typer.Option("--study", help="Each path is a CT study (DICOM folder or .zip, "
                                        "or NIfTI): one answer per study (patient).")] = False,
    series: SeriesOpt = None,
    slice_step: SliceStep = None,
    max_slices: MaxSlices = DEFAULT_MAX_SLICES,
    aggregate: AggregateOpt = Aggregate.topk,
    top_k: TopK = DEFAULT_TOP_K,
    plot: Annotated[Optional[Path], typer.Option(
        help="--study: folder for one PNG per study (needs matplotlib).")] = None,
) -> None:
    """Classify images with an exported model (no TensorFlow needed), on
    onnxruntime or OpenVINO.

    One row per image: path, probability of the positive class, label. A file
    that can't be read, or above the pixel budget (50 MP; `ctedge --max-pixels N predict ...`),
    gets an error row and the rest go on; exit code 1 if any failed.
    Example: `ctedge predict exports/b3.onnx scans/ --csv predictions.csv`;
    `ctedge predict exports/b3.onnx scans/ --runtime openvino --precision bf16`

    With `--study`, one row per CT study instead (see README, "Whole CT studies"):
    `ctedge predict exports/b3.onnx patient1/ patient2.zip --study --json studies.json`
    """
    from dataclasses import asdict

    from .imageio import expand_paths
    from .runtime import Classifier

    if study:
        options = StudyOptions(series_uid=series, slice_step=slice_step, max_slices=max_slices,
                               aggregate=aggregate, top_k=top_k, batch_size=batch_size,
                               keep_thumbnails=plot is not None)
        predict_studies_command(model, paths, options, provider, threads, csv_out, json_out, plot,
                                runtime=runtime, precision=precision, cache_dir=cache_dir)
        return
    files = expand_paths(paths)
    if not files:
        raise CtedgeError(f"no image files found in {', '.join(map(str, paths))}")
    check_outputs((csv_out, "--csv"), (json_out, "--json"))
    clf = Classifier(model, provider, threads, runtime=runtime, precision=precision,
                     cache_dir=str(cache_dir) if cache_dir else None)
    rows = clf.predict_files(files, batch_size)
    failed = print_file_rows(f"{model.name} on {clf.runtime} {clf.precision} ({clf.providers[0]}): "
                             f"P({clf.positive}), threshold {clf.threshold}", rows, "label")
    scored = [r.probability for r in rows if r.error is None]
    from .metrics import output_spread

    constant = warn_if_constant(output_spread(scored), len(scored))
    records = [asdict(r) for r in rows]
    write_csv(records, list(records[0]), csv_out)
    write_json({"model": str(model), "runtime": clf.runtime, "precision": clf.precision,
                "provider": clf.providers[0], "predictions": records,
                "warnings": [constant] if constant else []}, json_out)
    exit_if_failed(failed, len(rows))


def predict_studies_command(model: Path, paths: list[Path], options, provider: str, threads: int | None,
                            csv_out: Path | None, json_out: Path | None, plot: Path | None, *,
                            runtime: str = "auto", precision: str | None = None,
                            cache_dir: Path | None = None) -> None:
    """`predict --study`: one row per study, details below the table; exit 1 if any failed."""
    from rich.table import Table

    from .runtime import Classifier
    from .study import CSV_FIELDS, csv_row, predict_studies

    options.check()
    check_outputs((csv_out, "--csv"), (json_out, "--json"), (plot, "--plot", True))
    if plot is not None:
        try:
            from .plots import study_plot
        except ImportError:
            raise CtedgeError('--plot needs matplotlib: pip install "ctedge[train]"') from None
    clf = Classifier(model, provider, threads, runtime=runtime, precision=precision,
                     cache_dir=str(cache_dir) if cache_dir else None)
    results = predict_studies(clf, paths, options,
                              progress=lambda r: console.print(f"{r.input}: {r.study_uid or '-'} done",
                                                               highlight=False))
    table = Table(title=f"{model.name} on {clf.runtime} {clf.precision} ({clf.providers[0]}): P({clf.positive}) per study, "
                        f"threshold {clf.threshold}, aggregate {options.aggregate}")
    for column in ("input", "patient", "slices used/total", "probability", "label"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(r.input, r.patient_id, f"{r.slices_used}/{r.slices_total}",
                      "" if r.error else f"{r.probability:.4f}",
                      f"[red]error: {r.error}[/]" if r.error else r.label)
    console.print(table)
    for r in results:
        if r.series_uid:
            console.print(f"{r.input}: series {r.series_uid} ({r.series_description or 'no description'}), "
                          f"every {r.slice_step}. slice: {r.slices_sampled} sampled, "
                          f"{r.slices_without_lung} without lung, {r.slices_used} classified", highlight=False)
        for rejected in r.series_rejected:
            console.print(f"  rejected series {rejected['series_uid']} ({rejected['slices']} file(s)): "
                          f"{rejected['reason']}", highlight=False)
        for warning in r.warnings:
            console.print(f"  [yellow]warning:[/] {escape(warning)}", highlight=False)
    if plot is not None:
        for r in results:
            if not r.error:
                console.print(f"plot: {study_plot(r, plot)}", highlight=False, markup=False)
    write_csv([csv_row(r) for r in results], CSV_FIELDS, csv_out)
    write_json({"model": str(model), "provider": clf.providers[0], "threshold": clf.threshold,
                "options": {k: v for k, v in vars(options).items() if k != "keep_thumbnails"},
                "studies": [r.to_dict() for r in results]}, json_out)
    failed = sum(r.error is not None for r in results)
    if failed:
        console.print(f"[yellow]{failed} of {len(results)} stud(ies) got no answer[/]")
        raise typer.Exit(ExitCode.FAILED)


@command
def bench(
    models: Annotated[Optional[list[Path]], typer.Argument(
        help=".onnx or OpenVINO .xml (and .keras for a TF baseline) models; default: every .onnx in exports/.")] = None,
    runtime: Annotated[BenchRuntime, typer.Option(
        help="all: every runtime × precision × provider this machine has (saves the fastest within tolerance "
             "beside the model for --runtime auto).")] = BenchRuntime.onnxruntime,
    precision: PrecisionOpt = None,
    provider: ProviderOpt = Provider(BenchOptions.provider),
    all_providers: Annotated[bool, typer.Option(
        "--all-providers", help="Every onnxruntime provider this machine has, instead of --provider.")] = False,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = ",".join(
        map(str, BenchOptions().batch_sizes)),
    threads: Threads = None,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up calls.")] = BenchOptions.warmup,
    runs: Annotated[int, typer.Option(help="Timed calls per measure.")] = BenchOptions.runs,
    seconds: Annotated[Optional[float], typer.Option(help="Time each measure for S seconds instead of --runs.")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Images (class folders give accuracy/AUC on all of them); default: generated.")] = None,
    split_dir: Annotated[Optional[Path], typer.Option(
        help="Official split lists: accuracy on --split of --data only.")] = None,
    split: Annotated[Split, typer.Option(help="Split for accuracy with --split-dir.")] = Split(BenchOptions.split),
    accuracy_images: Annotated[Optional[int], typer.Option(
        help="Score a seeded sample of N labelled images instead of all (stated in the report).")] = None,
    auc_tolerance: Annotated[float, typer.Option(
        help="A variant is within tolerance when |AUC - fp32 AUC| is at most this (labelled data).")
    ] = BenchOptions.auc_tolerance,
    cache_dir: CacheDir = None,
    save_choice: Annotated[bool, typer.Option(
        help="With --runtime all, write MODEL.runtime.json (the fastest within tolerance) for --runtime auto.")] = True,
    budget_ms: Annotated[float, typer.Option(help="End-to-end budget per image (the seed's 'few seconds').")
                         ] = DEFAULT_BUDGET_MS,
    markdown_out: Annotated[Optional[Path], typer.Option("--markdown", help="Write the table as markdown.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Latency histogram PNG (needs matplotlib).")] = None,
    json_out: JsonOut = None,
    study: Annotated[Optional[Path], typer.Option(
        help="Time one CT study (folder/.zip) end to end instead, split into stages.")] = None,
    slice_step: Annotated[Optional[int], typer.Option(
        help=f"--study: every Nth slice (default: at most {DEFAULT_MAX_SLICES}).")] = None,
    study_runs: Annotated[int, typer.Option(help="--study: timed runs (and fresh-process runs).")] = 3,
) -> None:
    """Latency (min/mean/p50/p90/p99/max), throughput, cold start, end-to-end time
    from a file, accuracy/AUC with n and a 95% bootstrap CI (and its change against
    the model's fp32 run on the same images) and size per model, runtime,
    precision and provider, with a verdict against the time budget. Variants are
    timed interleaved.

    Example: `ctedge bench exports/b3.onnx --runtime all --data ../shared/data/covid-ct
    --split-dir ../shared/data/covid-ct/splits --markdown bench.md`;
    for a whole study: `ctedge bench exports/b3.onnx --study patient1/ --json -`
    """
    from rich.table import Table

    from .bench import budget_line, closing_lines, isa_line, markdown, run_bench, table_rows

    check_outputs((markdown_out, "--markdown"), (plot, "--plot"), (json_out, "--json"))
    if study is not None:
        bench_study_command(models or [], study, provider, threads, slice_step, study_runs, json_out,
                            runtime, precision)
        return

    try:
        sizes = [int(b) for b in batch_sizes.split(",")]
    except ValueError:
        raise CtedgeError(f"--batch-sizes must be comma-separated integers, not {batch_sizes!r}") from None
    report = run_bench(models or [], BenchOptions(
        provider=provider, batch_sizes=sizes, threads=threads, warmup=warmup, runs=runs, seconds=seconds,
        data=str(data) if data else None, budget_ms=budget_ms,
        runtime=runtime, precision=precision, split_dir=str(split_dir) if split_dir else None, split=split,
        accuracy_images=accuracy_images, auc_tolerance=auc_tolerance,
        cache_dir=str(cache_dir) if cache_dir else None, save_choice=save_choice, all_providers=all_providers))
    m = report["machine"]
    engines = ", ".join(filter(None, [m["onnxruntime"] and f"onnxruntime {m['onnxruntime']}",
                                      m["openvino"] and f"OpenVINO {m['openvino']}"]))
    table = Table(title=f"{m['cpu']}, {m['cores']} cores, {engines}")
    shown = {"model": "model", "format": "runtime", "provider": "provider", "batch": "batch",
             "p50 ms": "p50 ms", "p99 ms": "p99 ms", "/ fp32": "/fp32", "images/s": "img/s",
             "end-to-end p50 ms": "e2e p50 ms", "cold start ms": "cold ms", "AUC": "AUC (95% CI) n",
             "AUC Δ": "AUC Δ"}  # row key -> short console header
    for header in shown.values():
        table.add_column(header, justify="right")
    for row in table_rows(report):
        table.add_row(*[row[c].replace("ExecutionProvider", "") for c in shown])
    console.print(table)
    console.print(isa_line(m), highlight=False)
    if report.get("accuracy_data"):
        console.print(f"accuracy on {report['accuracy_data']}", highlight=False)
    for r in report["results"]:
        if r.get("constant_warning"):
            console.print(f"[bold red]warning:[/] {Path(r['model']).name}: {r['constant_warning']}",
                          highlight=False)
        if "budget" in r:
            within, line = budget_line(r)
            console.print(f"[{'green' if within else 'red'}]{escape(line)}[/]", highlight=False)
    for line in closing_lines(report):
        console.print(f"[bold]{escape(line)}[/]", highlight=False)
    write_text(markdown(report), markdown_out)
    if plot:
        try:
            from .plots import latency_histogram
        except ImportError:
            raise CtedgeError("--plot needs matplotlib (pip install ctedge[train])") from None
        latency_histogram({f"{Path(r['model']).name} {r['format']} {r['provider']}": np.asarray(r["samples_ms"])
                           for r in report["results"]}, plot)
    write_json(report, json_out)


def bench_study_command(models: list[Path], study: Path, provider: str, threads: int | None,
                        slice_step: int | None, runs: int, json_out: Path | None,
                        runtime: str = "auto", precision: str | None = None) -> None:
    """`bench --study`: stage split and slices/s of one study (median of the runs)."""
    from rich.table import Table

    from .bench import find_models
    from .study import STAGES, TARGET_RATIO, bench_study

    for model in find_models(models):
        report = bench_study(model, study, StudyOptions(slice_step=slice_step), provider, threads, runs,
                             runtime="auto" if runtime == "all" else runtime, precision=precision)
        m, med = report["machine"], report["median"]
        table = Table(title=f"{model.name} on {report['provider']}, {m['cpu']}, {m['cores']} cores: "
                            f"{med['slices_used']:.0f} of {med['slices_total']:.0f} slices "
                            f"(every {med['slice_step']:.0f}.), median of {runs}")
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        for stage in STAGES + ("pipeline_wall_s", "wall_s"):
            table.add_row(stage, f"{med[stage]:.3f}")
        console.print(table)
        console.print(f"{med['slices_per_s']:.1f} slices/s; pipeline wall / (slices used x "
                      f"{report['per_slice_inference_s'] * 1000:.1f} ms batched inference per slice) = "
                      f"{med['target_ratio']:.2f} (target <= {TARGET_RATIO}); model load {report['session_s']:.2f} s; "
                      f"fresh process, command start to answer: {report['process_wall_s']['median']:.2f} s")
        write_json(report, json_out)


if __name__ == "__main__":
    app()
