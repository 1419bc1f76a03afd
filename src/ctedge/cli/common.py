"""What every command shares: option groups, the error handler, output writers."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.text import Text

from ctedge.cli.commands import flag, group_option, registry
from ctedge.core.choices import (
    Aggregate,
    Backbone,
    Clean,
)
from ctedge.core.errors import CtedgeError, ExitCode
from ctedge.core.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ctedge.core.logs import quiet_libraries
from ctedge.core.progress import console
from ctedge.edge.engines import Precision, Provider

if TYPE_CHECKING:  # the library's types, imported by the commands that use them (start-up stays light)
    from ctedge.core.data import DataOptions
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.core.results import ImageEvaluation, StudyEvaluation
    from ctedge.core.runconfig import ModelConfig
    from ctedge.edge.study import StudyOptions

log = logging.getLogger(__name__)

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
FreezeBackbone = Annotated[Optional[bool], typer.Option(
    "--freeze-backbone/--train-backbone",
    help="Train only the head (default: yes with pretrained weights, no with --weights none).")]
FineTuneBlocks = Annotated[int, typer.Option(
    help="Also train the top N backbone blocks (1-7; tune: trains full models, no feature cache).")]
# training
Epochs = Annotated[int, typer.Option(help="Epochs (train: the paper's 100; tune: per trial, early stopping on "
                                          "the objective; Hyperband: the largest budget).")]
BatchSize = Annotated[int, typer.Option(help="Batch size (paper: 16).")]
Patience = Annotated[int, typer.Option(help="Early-stopping patience (epochs).")]

JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON ('-' for stdout).")]
HtmlOut = Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML page.")]

# inference (predict, bench)
ProviderOpt = Annotated[Provider, typer.Option(
    "--provider", help="Device. onnxruntime: auto | cpu | cuda | tensorrt (tensorrt without its libraries: CUDA, "
                       "with a message; a device this install lacks is an error); openvino: auto | cpu | gpu | npu.")]
ProviderOptions = Annotated[Optional[list[str]], typer.Option(
    "--provider-option", help="KEY=VALUE given to the device's backend (repeatable), e.g. "
                              "cudnn_conv_algo_search=HEURISTIC (CUDA), trt_fp16_enable=True (TensorRT), "
                              "PERFORMANCE_HINT=THROUGHPUT (OpenVINO); recorded in the results.")]
Pad = Annotated[Optional[bool], typer.Option(
    "--pad/--no-pad", help="Run every call at one batch size, the last batch padded (default: on a GPU, "
                           "warmed up with that shape at start).")]
Threads = Annotated[Optional[int], typer.Option(help="Inference threads (default: all cores).")]
PrecisionOpt = Annotated[Optional[Precision], typer.Option(
    "--precision", help="OpenVINO: bf16/fp16 are inference precisions of the fp32 model (CPU support "
    "needed), int8 the IR from `export --openvino`; onnxruntime: fp16/int8 run the NAME_fp16/NAME_int8.onnx "
    "files from export. Default: auto's choice, else fp32.")]
CacheDir = Annotated[Optional[Path], typer.Option(
    help="Engine cache: OpenVINO's compiled models, onnxruntime's CPU-optimized graphs (default "
         "$CTEDGE_CACHE_DIR/ENGINE, else ~/.cache/ctedge/ENGINE): a second start skips compiling.")]

# whole-study classification (predict --study, evaluate --study)
SeriesOpt = Annotated[Optional[str], typer.Option("--series", help="--study: classify this SeriesInstanceUID.")]
SliceStep = Annotated[Optional[int], typer.Option(
    help="--study: take every Nth slice (default: the smallest step giving at most --max-slices).")]
MaxSlices = Annotated[int, typer.Option(help="--study: slices sampled at most when --slice-step is unset.")]
AggregateOpt = Annotated[Aggregate, typer.Option("--aggregate", help="--study: how slice probabilities become "
                                                                    "the study's.")]
TopK = Annotated[int, typer.Option(help="--study: slices averaged by --aggregate topk.")]
RuleOpt = Annotated[Optional[list[str]], typer.Option(
    "--rule", help="--study: a rule for which series may be scored, KEY=VALUE (repeatable): modality, "
                   "image-type-require, image-type-exclude, body-part, body-part-required, description-include, "
                   "description-exclude, min-thickness-mm, max-thickness-mm, min-slices; empty turns a rule off. "
                   "A study with no series meeting them is 'not eligible' (see README, 'Which series').")]


def provider_options(values: list[str] | None) -> dict[str, str]:
    """--provider-option KEY=VALUE pairs as a dict; a value without '=' exits 2 naming it."""
    options = {}
    for value in values or []:
        key, sep, setting = value.partition("=")
        if not sep or not key.strip():
            raise CtedgeError(f"--provider-option must be KEY=VALUE, not {value!r}")
        options[key.strip()] = setting.strip()
    return options


def data_options(data: Path, *, positive: str | None, split_dir: Path | None, group_regex: str | None,
                 seed: int, test_fraction: float, val_fraction: float, clean: Clean = Clean.drop) -> DataOptions:
    """The data and split groups."""
    from ctedge.core.data import DataOptions

    return DataOptions(root=str(data), split_dir=str(split_dir) if split_dir else None, positive=positive,
                       seed=seed, test_fraction=test_fraction, val_fraction=val_fraction,
                       group_regex=group_regex, clean=clean, max_pixels=pixel_budget())


def preprocess_config(*, image_size: int, window_low: float, window_high: float, centre: float,
                      rotation: float, shift: float, flip: bool, zoom: float) -> PreprocessConfig:
    """The preprocessing and augmentation group."""
    from ctedge.core.preprocess import AugmentConfig, PreprocessConfig

    return PreprocessConfig(image_size=image_size, window_low=window_low, window_high=window_high, centre=centre,
                            augment=AugmentConfig(rotation_deg=rotation, shift=shift, horizontal_flip=flip,
                                                  zoom=zoom))


def model_config(*, weights: str, backbone: Backbone | None, freeze_backbone: bool | None,
                 fine_tune_blocks: int, units: int | None = None, dropout: float | None = None) -> ModelConfig:
    """The model group; the backbone defaults to a trained model's (``--weights RUN``), else b3."""
    from ctedge.core.runconfig import ModelConfig
    from ctedge.training.model import saved_backbone

    head = {name: value for name, value in (("units", units), ("dropout", dropout)) if value is not None}
    return ModelConfig(weights=weights, backbone=backbone or saved_backbone(weights) or Backbone.b3,
                       freeze_backbone=freeze_backbone, fine_tune_blocks=fine_tune_blocks, **head)


class PrintableLog(logging.Filter):
    """Log lines carry text from files (paths, DICOM tags): shown without control characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.msg, record.args = clean(record.getMessage()), None
        except (TypeError, ValueError):  # a malformed call: logged as it is
            pass
        return True


def verbose() -> bool:
    """Whether ``ctedge --verbose`` was given."""
    return bool(group_option("verbose", False))


def _setup_logging() -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False)
    handler.addFilter(PrintableLog())
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]", handlers=[handler])
    quiet_libraries()


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
                from ctedge.training.quiet import import_tensorflow
                import_tensorflow(verbose())
            return func(*args, **kwargs)
        except CtedgeError as exc:
            message = exc.with_name(flag(exc.param)) if exc.param else str(exc)
            console.print(Text.assemble(("error:", "bold red"), " ", clean(message)), highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return registry.command()(wrapper)  # listed by the `ctedge` group (cli/commands.py)


STDOUT_OPTIONS = ("--json", "--csv", "--markdown")  # the outputs that '-' sends to stdout


def check_outputs(*outputs: tuple[Path | None, str] | tuple[Path | None, str, bool],
                  inputs: Iterable[Path] = ()) -> None:
    """(path, option[, is_folder]) for each output: refuse one that can't be written,
    or one that is an input (``inputs``: files, and folders whose image or DICOM files
    are read), exit 2 naming it, before any model or data is loaded; unset ones pass."""
    from ctedge.core.files import check_writable

    inputs = list(inputs)
    for path, what, *folder in outputs:
        if path is None:
            continue
        if str(path) == "-" and what not in STDOUT_OPTIONS:
            raise CtedgeError(f"{what} -: this output can't go to stdout (only {', '.join(STDOUT_OPTIONS)} "
                              "can); name a file")
        check_writable(path, what, bool(folder and folder[0]))
        if not (folder and folder[0]) and str(path) != "-":
            _refuse_input(path, what, inputs)


def _refuse_input(path: Path, what: str, inputs: list[Path]) -> None:
    from ctedge.core.files import same_file
    from ctedge.core.imageio import SUPPORTED_SUFFIXES, is_dicom

    for given in inputs:
        if same_file(path, given):
            raise CtedgeError(f"{what} {path}: is an input ({given}); it would be overwritten")
        if given.is_dir() and path.is_file() and given.resolve() in path.resolve().parents and \
                (path.suffix.lower() in SUPPORTED_SUFFIXES or is_dicom(path)):
            raise CtedgeError(f"{what} {path}: is an input (an image in {given}); it would be overwritten")


def model_files(model: Path) -> list[Path]:
    """The model and the files that travel with it (card, OpenVINO weights, fp16/int8
    variants): outputs never overwrite them."""
    stems = [model.stem, *(f"{model.stem}_{variant}" for variant in ("fp16", "int8", "ov", "ov_int8"))]
    return [model, model.with_name(model.stem + ".runtime.json"),
            *(model.with_name(stem + suffix) for stem in stems for suffix in (".onnx", ".json", ".xml", ".bin"))]


def plots_module(option: str):
    """``ctedge.core.plots``, or exit 2 naming the extra that brings matplotlib (checked
    before the work)."""
    import importlib

    try:
        return importlib.import_module("ctedge.core.plots")
    except ImportError:
        raise CtedgeError(f'{option} needs matplotlib: pip install "ctedge[eval]"') from None


def clean(value: object) -> str:
    """Text from a file (a path, a PatientID) made safe for the terminal (``printable``)."""
    from ctedge.core.files import printable

    return printable(value)


def shown(value: object, style: str = "") -> Text:
    """``clean(value)`` as rich text: printed as it is, never read as markup."""
    return Text(clean(value), style=style)


def write_text(text: str, path: Path | None) -> None:
    """To stdout for '-', else atomically (never a half-written file); undecodable
    bytes of file names are written back as they were."""
    from ctedge.core.files import WriteError, atomic_write

    if path is None:
        return
    data = text.encode("utf-8", "surrogateescape")
    if str(path) != "-":
        atomic_write(data, path)
        return
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except OSError as exc:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to a dead stdout
        if isinstance(exc, BrokenPipeError):  # `ctedge ... --csv - | head`: the reader has gone
            raise typer.Exit(ExitCode.OK) from None
        raise WriteError(f"stdout: cannot write ({exc.strerror or exc})") from None


def write_json(result, path: Path | None) -> None:
    """A report as JSON; an undefined metric's NaN becomes null with a warning (``dumps``)."""
    from ctedge.core.results import dumps

    if path is not None:
        write_text(dumps(result, strict=False), path)


def write_csv(records: list[dict], fields: list[str], path: Path | None) -> None:
    """CSV with every cell neutralised against formula injection (``csv_cell``)."""
    from ctedge.core.files import csv_text

    write_text(csv_text(fields, records), path)


def print_file_rows(title: str, rows: list, third: str) -> int:
    """Table of per-file results (path, probability, ``third`` attribute), errors
    in red, file text shown as text; returns how many files failed."""
    from rich.table import Table

    table = Table(title=shown(title))
    for column in ("path", "probability", third):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(shown(row.path), "" if row.error else f"{row.probability:.4f}",
                      shown(f"error: {row.error}", "red") if row.error else shown(getattr(row, third)))
    console.print(table)
    return sum(row.error is not None for row in rows)


def warn_if_constant(spread: float | None, images: int) -> str | None:
    """Print the constant-model warning when it applies; returns it."""
    from ctedge.core.metrics import constant_message

    message = constant_message(float("nan") if spread is None else spread, images)
    if message:
        console.print(f"[bold red]warning:[/] {message}", highlight=False)
    return message


def exit_if_failed(failed: int, total: int) -> None:
    if failed:
        console.print(f"[yellow]{failed} of {total} file(s) could not be read[/]")
        raise typer.Exit(ExitCode.FAILED)


def pixel_budget() -> int:
    """The pixel budget given to `ctedge` (--max-pixels, CTEDGE_MAX_PIXELS), passed to
    whatever reads an image."""
    return group_option("max_pixels", DEFAULT_MAX_PIXELS)


def study_options(**options) -> StudyOptions:
    """StudyOptions with the read budgets given to `ctedge` (--max-pixels, --max-bytes)."""
    from ctedge.edge.study import StudyOptions

    return StudyOptions(max_pixels=pixel_budget(), max_bytes=group_option("max_bytes", DEFAULT_MAX_BYTES), **options)


def figure(value: float | None, digits: int = 3) -> str:
    """A metric for a table: fixed digits, '-' where it is undefined."""
    return "-" if value is None else f"{value:.{digits}f}"


def print_metrics(report: ImageEvaluation | StudyEvaluation) -> None:
    """Metric table with CIs, confusion matrix and operating points of an evaluation
    (``ctedge.core.results``)."""
    from rich.table import Table

    from ctedge.core.results import StudyEvaluation

    if isinstance(report, StudyEvaluation):
        title = (f"{report.studies} studies of {report.patients} patients ({report.positive} "
                 f"positive), threshold {report.threshold}, CIs resampled by patient")
    else:
        title = f"{report.split} split: {report.images} images ({report.positive} positive), " \
                f"threshold {report.threshold}"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    for name, entry in report.metrics.items():
        lo, hi = entry.ci95
        table.add_row(name, figure(entry.value), f"{figure(lo)} - {figure(hi)}")
    console.print(table)
    (tn, fp), (fn, tp) = report.confusion
    console.print(f"confusion: TN {tn}  FP {fp}  FN {fn}  TP {tp};  ECE {figure(report.ece)}")
    for name, value in report.operating_points.items():
        console.print(f"  {name.replace('_', ' ')}: {value:.3f}")
    warn_if_constant(report.output_spread, report.scored)
    if not isinstance(report, StudyEvaluation):
        from ctedge.evaluation.evaluate import drift_warning

        for name, drift in report.split_drift.items():
            console.print(f"[bold red]warning:[/] {escape(drift_warning(name, drift))}", highlight=False)
    baseline = report.shortcut_baseline
    if "auc" in baseline:
        console.print(f"shortcut baseline (file metadata only, trained on train): AUC {baseline['auc']:.3f} "
                      f"beside the model's {figure(report.metrics['auc'].value)}")
