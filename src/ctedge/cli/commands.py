"""Which module defines each `ctedge` command, and the group that loads it only when
used: `ctedge --help` lists the commands from ``COMMANDS`` (no command module, so no
numpy, OpenCV, pydicom or engine is imported), and a command's module, with what it
imports, is loaded when that command runs or shows its own help. A test keeps the
table and the modules in step.
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperCommand, TyperGroup

# command -> (its module, the line `ctedge --help` shows: the first sentence of its docstring),
# in the workflow's order
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ctedge.cli.train", "Train EfficientNetB3 + the paper's head on a data folder."),
    "demo": ("ctedge.cli.train", "Generate synthetic CT-like phantoms, train a small model (weights none, 64 px), "
                                 "evaluate it on held-out phantoms."),
    "export": ("ctedge.cli.train", "Export a trained model to ONNX with preprocessing inside, metadata, a parity "
                                   "gate against Keras, and optional FP16/INT8 variants, each with a model card "
                                   "(NAME.json)."),
    "tune": ("ctedge.cli.train", "Search head width, learning rate and dropout around the paper's defaults with "
                                 "Keras Tuner; resumable (rerun the same command), fast on cached backbone "
                                 "features."),
    "evaluate": ("ctedge.cli.evaluate", "Accuracy, precision, sensitivity, specificity, F1 and AUC with bootstrap "
                                        "95% CIs, confusion matrix, ROC and calibration plots."),
    "audit": ("ctedge.cli.evaluate", "Find leakage and shortcuts: near-duplicates within/across splits, annotated "
                                     "images, a metadata-only shortcut baseline, class balance, unreadable/small "
                                     "images."),
    "explain": ("ctedge.cli.evaluate", "Grad-CAM heatmaps for the positive class: where in each image the model "
                                       "found its evidence."),
    "report": ("ctedge.cli.evaluate", "One self-contained HTML page for a training run or tuning project: data "
                                      "summary, audit findings, metrics with CIs, ROC (with the metadata "
                                      "shortcut's), confusion matrix, calibration and a grid of Grad-CAM explained "
                                      "images."),
    "predict": ("ctedge.cli.predict", "Classify images with an exported model (no TensorFlow needed), on "
                                      "onnxruntime or OpenVINO."),
    "bench": ("ctedge.cli.bench", "Latency, throughput, cold start, end-to-end time, accuracy/AUC with a 95% "
                                  "CI and size per model, runtime, precision and provider, with a verdict against "
                                  "the time budget."),
    "serve": ("ctedge.cli.serve", "Run a DICOM node and an HTTP API with one loaded model."),
}

# the commands themselves, filed here by ``ctedge.cli.common.command`` as their modules load
registry = typer.Typer(rich_markup_mode="markdown")


class LazyCommands(TyperGroup):
    """The `ctedge` group over ``COMMANDS``: a command's module is imported on first use;
    the group's own help shows the table's lines instead of importing every module."""

    listing = False  # set while the group's help is drawn

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, cmd_name: str):
        if cmd_name not in COMMANDS:
            return None
        module, summary = COMMANDS[cmd_name]
        if self.listing:
            return TyperCommand(name=cmd_name, short_help=summary)
        importlib.import_module(module)
        built = typer.main.get_command(registry)
        if isinstance(built, TyperGroup):
            return built.commands.get(cmd_name)
        return built if built.name == cmd_name else None

    def format_help(self, ctx, formatter) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False
