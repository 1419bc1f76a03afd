"""`ctedge train`, `tune`, `export` and `demo`: the TensorFlow commands that make models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ctedge.cli.common import (
    BackboneOpt,
    BatchSize,
    Centre,
    CleanOpt,
    DataArg,
    Epochs,
    FineTuneBlocks,
    Flip,
    FreezeBackbone,
    GroupRegex,
    ImageSize,
    JsonOut,
    Patience,
    Positive,
    Rotation,
    Seed,
    Shift,
    SplitDir,
    TestFraction,
    ValFraction,
    Weights,
    WindowHigh,
    WindowLow,
    Zoom,
    check_outputs,
    command,
    data_options,
    model_config,
    pixel_budget,
    preprocess_config,
    print_metrics,
    shown,
    warn_if_constant,
    write_json,
)
from ctedge.cli.progress import Bars
from ctedge.core.choices import (
    Algorithm,
    Backbone,
    Clean,
    Objective,
    Role,
)
from ctedge.core.data import DataOptions
from ctedge.core.errors import CtedgeError, ExitCode
from ctedge.core.metrics import DEFAULT_THRESHOLD
from ctedge.core.preprocess import AugmentConfig, PreprocessConfig
from ctedge.core.progress import console
from ctedge.core.results import plain
from ctedge.core.runconfig import ModelConfig, TrainConfig

# the head and learning-rate options train and tune share (their defaults from the library's configs)
Units = Annotated[Optional[int], typer.Option(
    help=f"Width of the head's dense layer (default {ModelConfig.units}; tune: the first trial's, where the "
         "search starts).")]
Dropout = Annotated[Optional[float], typer.Option(
    help=f"Dropout after the dense layer (default {ModelConfig.dropout}; tune: the first trial's).")]
LearningRate = Annotated[Optional[float], typer.Option(
    "--lr", help=f"Adam learning rate (default the paper's {TrainConfig.learning_rate}; tune: the first "
                 "trial's).")]
Eager = Annotated[bool, typer.Option(
    "--eager", help="Run Keras eagerly, without graph tracing: faster for a few dozen small images (smoke runs, "
                    "tests), slower on real data; for debugging.")]


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
    eager: Eager = False,
    json_out: JsonOut = None,
) -> None:
    """Train EfficientNetB3 + the paper's head on a data folder.

    Example: `ctedge train ../shared/data/covid-ct --split-dir ../shared/data/covid-ct/splits
    --weights none --image-size 128 --epochs 3`

    Killed or interrupted? Rerun the same command with `--resume` (and the same `-o`).
    """
    from ctedge.training.train import default_run_dir
    from ctedge.training.train import train as run_training

    run_dir = out if (out or resume) else default_run_dir()
    check_outputs((run_dir, "--out", True), (json_out, "--json"), inputs=[data])
    with Bars() as bars:
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
            run_dir, resume, bars, eager=eager)
    result = summary["result"]
    for name, part in summary["splits"].items():
        if part["unreadable"]:
            console.print(f"[yellow]{name}: skipped {len(part['unreadable'])} unreadable file(s):[/]")
            for item in part["unreadable"]:
                console.print(shown(f"  {item['path']}: {item['reason']}"))
        if part["dropped"]:
            console.print(f"{name}: dropped {len(part['dropped'])} image(s) with annotation marks")
    best = {k: v for k, v in result.items() if k.startswith("best_")}
    console.print(f"[green]trained[/] {result['epochs_run']} epoch(s) in {result['seconds']:.0f} s, "
                  f"{result['images_per_s']:.1f} images/s, "
                  + ", ".join(f"{k} {v:.4f}" for k, v in best.items()))
    console.print(f"run folder: {run_dir} (model.keras, config.json, history.csv, "
                  "training_curves.png, tensorboard/)")
    write_json(summary, json_out)


@command(tensorflow=True)
def demo(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the data, run and report "
                                                "(default demo/, with --study demo-study/).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default 12).")] = None,
    per_class: Annotated[int, typer.Option(help="Phantoms per class.")] = 200,
    backbone: Annotated[Backbone, typer.Option(help="b3 (the paper's) | tiny (for smoke runs).")] = Backbone.b3,
    json_out: JsonOut = None,
    study: Annotated[bool, typer.Option("--study", help="Whole-study path instead: phantom DICOM patients, "
                                        "train on the training patients' slices, export to ONNX, "
                                        "predict --study and patient-level evaluation on held-out patients.")] = False,
    patients: Annotated[int, typer.Option(help="--study: phantom patients per class, half held out.")] = 32,
    slices: Annotated[int, typer.Option(help="--study: slices per axial series (64x64 px).")] = 24,
    eager: Eager = False,
) -> None:
    """Generate synthetic CT-like phantoms, train a small model (weights none, 64 px),
    evaluate it on held-out phantoms. Runs in a few minutes on a 2-core CPU.
    Example: `ctedge demo -o demo` (a smoke run: `ctedge demo --backbone tiny --epochs 1 --eager`)

    `ctedge demo --study` does it for whole CT studies (see README, "Whole CT studies"):
    `ctedge demo --study` then `ctedge report demo-study/run --study --data demo-study/studies/test`
    """
    check_outputs((out or Path("demo-study" if study else "demo"), "--out", True), (json_out, "--json"))
    if study:
        from ctedge.demo import run_study_demo

        with Bars() as bars:
            report = run_study_demo(out or Path("demo-study"), epochs or 12, patients, slices, backbone,
                                    progress=bars, eager=eager)
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
                      f"(model.keras, model.onnx)\npatient-level evaluation: {evaluation.out_dir}\n"
                      f"took {report['seconds']:.0f} s ("
                      + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in report["stage_seconds"].items())
                      + f")\nagain by hand: ctedge predict {onnx} {report['studies']}/test/CT_COVID/* --study; "
                      f"ctedge evaluate {onnx} {report['studies']}/test --study; "
                      f"ctedge report {report['run_dir']} --study --data {report['studies']}/test",
                      highlight=False, markup=False)
        write_json(plain(report), json_out)
        return
    from ctedge.demo import run_demo

    with Bars() as bars:
        report = run_demo(out or Path("demo"), epochs or 12, per_class, backbone, progress=bars, eager=eager)
    print_metrics(report["evaluation"])
    console.print(report["verdict"])
    console.print(f"data: {report['data']}\nrun:  {report['run_dir']}\n"
                  f"took {report['seconds']:.0f} s")
    write_json(plain(report), json_out)


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
    keep_flagged: Annotated[bool, typer.Option(
        "--keep-flagged", help="Write a flagged variant (outside its --*-tolerance) anyway, marked in its card "
                               "(by default it is dropped: not written).")] = False,
    fail_on_flagged: Annotated[bool, typer.Option(
        "--fail-on-flagged", help="Exit 1 when a variant is flagged (dropped or kept).")] = False,
    json_out: JsonOut = None,
) -> None:
    """Export a trained model to ONNX with preprocessing inside, metadata, a parity gate
    against Keras, and optional FP16/INT8 variants, each with a model card (NAME.json).

    Example: `ctedge export runs/b3-128/model.keras --onnx --fp16 --int8 --openvino
    --calibration-data ../shared/data/covid-ct --check-data ../shared/data/covid-ct`
    """
    from ctedge.training.export import ExportOptions, default_output, export_onnx, latest_model

    if not (onnx or openvino):
        raise CtedgeError("say which format: --onnx and/or --openvino (which converts the verified ONNX file)")
    if model is None:
        model = latest_model()
        console.print(f"exporting {model} (newest model found)")
    check_outputs((output or default_output(model), "--output"), (json_out, "--json"),
                  inputs=[model, *filter(None, [calibration_data, check_data])])
    report = export_onnx(model, output, ExportOptions(
        opset=opset, fp16=fp16, int8=int8,
        calibration_data=str(calibration_data) if calibration_data else None,
        check_data=str(check_data) if check_data else None, check_count=check_count,
        threshold=threshold, tolerance=tolerance, fp16_tolerance=fp16_tolerance,
        int8_tolerance=int8_tolerance, openvino=openvino, allow_constant=allow_constant,
        keep_flagged=keep_flagged, max_pixels=pixel_budget()))
    flagged = _print_export(report)
    write_json(plain(report), json_out)
    if flagged and fail_on_flagged:
        raise typer.Exit(ExitCode.FAILED)


def _print_export(report: dict) -> list[str]:
    """The variants table and the dropped/flagged lines; returns the variants beyond tolerance."""
    from rich.table import Table

    from ctedge.training.export import FLAGGED_MESSAGE

    table = Table(title=f"ONNX export of {report['model']}")
    for column in ("variant", "file", "MB", "max |Δp|", "agree", "AUC Δ", "status"):
        table.add_column(column)
    flagged = []
    for name, card in report["variants"].items():
        check = card["parity"]
        if check["status"] != "ok":
            flagged.append(name)
        auc = f"{check['auc_change']:+.4f}" if "auc_change" in check else "-"
        table.add_row(name, Path(card["file"]).name if card["file"] else "-",
                      f"{card['size_mb']:.1f}" if card["size_mb"] is not None else "-",
                      f"{check['max_abs_diff']:.2e}", f"{check['decision_agreement']:.3f}", auc,
                      "ok" if check["status"] == "ok" else f"[yellow]{check['status'].upper()}[/]")
    console.print(table)
    spread = report["output_spread"]
    console.print(f"parity on {spread['check_data']}, where the model's outputs span {spread['value']:.3g}; "
                  f"files and model cards (.json) in {Path(report['output']).parent}")
    warn_if_constant(spread["value"], spread["images"])
    dropped = [name for name in flagged if report["variants"][name]["parity"]["status"] == "dropped"]
    if dropped:
        console.print(f"[yellow]dropped (beyond tolerance, not written): {', '.join(dropped)}[/]")
    if flagged:
        console.print(f"[yellow]{FLAGGED_MESSAGE}[/]")
    return flagged


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
    eager: Eager = False,
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
    from ctedge.training.tuning import TuneOptions, set_distributed
    from ctedge.training.tuning import tune as run_tuning

    check_outputs((directory, "--directory", True), (json_out, "--json"))
    set_distributed(role, oracle, tuner_id)
    with Bars() as bars:
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
                        seed=seed, eager=eager),
            _search_space(search_space, units, learning_rate, dropout), bars)
    _print_trials(summary, objective)
    write_json(summary, json_out)


def _search_space(path: Path | None, units: int | None, learning_rate: float | None, dropout: float | None):
    """The search space (from its file or the default) with the first trial's values given."""
    from dataclasses import replace

    from ctedge.training.tuning import SearchSpace

    space = SearchSpace.from_file(path) if path else SearchSpace()
    first = {name: value for name, value in (("default_units", units), ("default_lr", learning_rate),
                                             ("default_dropout", dropout)) if value is not None}
    return replace(space, **first)


def _print_trials(summary: dict, objective: str) -> None:
    """The trials table of a finished search, best first, and the best model; what a
    worker ran."""
    from rich.table import Table

    if summary.get("role") == "worker":
        console.print(f"worker {summary['tuner_id']} ran trial(s) {', '.join(summary['trials_run']) or 'none'}; "
                      f"the chief writes {summary['project']}/summary.json")
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
