"""The `ctedge` group: which module defines each command, loaded only when used, and
the group's own options. `ctedge --help` lists the commands from ``COMMANDS`` as plain
click help (no command module, so no numpy, OpenCV, pydicom or engine, and not rich's
markdown), and a command's module, with what it imports, is loaded when that command
runs or shows its own help. A test keeps the table and the modules in step.
"""

from __future__ import annotations

import functools
import importlib
from contextvars import ContextVar
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from ctedge import __version__
from ctedge.core.errors import CtedgeError
from ctedge.core.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

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


@functools.lru_cache(maxsize=1)
def _built(registered: int):
    """The registry's commands as click commands, built again only when a module has filed
    more (``registered``: how many); one lookup no longer rebuilds every loaded command."""
    return typer.main.get_command(registry)


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
        built = _built(len(registry.registered_commands))
        if isinstance(built, TyperGroup):
            return built.commands.get(cmd_name)
        return built if built.name == cmd_name else None

    def format_help(self, ctx, formatter) -> None:
        # plain click help: the listing needs no markup, and rich's markdown costs ~0.1 s to import
        self.listing, markup, self.rich_markup_mode = True, self.rich_markup_mode, None
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing, self.rich_markup_mode = False, markup


app = typer.Typer(cls=LazyCommands, add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Put a chest-CT COVID-19 classifier onto edge hardware.\n\n"
                       "Workflow: ctedge train DATA (or ctedge tune DATA), "
                       "ctedge export --onnx, ctedge bench.")

# Library parameter -> the flag that sets it, where the two names differ
# (otherwise --name-with-dashes); a library error about a parameter shows the flag.
FLAGS = {"learning_rate": "--lr", "run_dir": "--out", "rotation_deg": "--rotation", "horizontal_flip": "--flip",
         "time_budget_min": "--time-budget", "explain_count": "--explain", "series_uid": "--series",
         "data": "--data", "split_dir": "--split-dir", "cpus_per_actor": "--ray-cpus", "rules": "--rule"}


def flag(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


# What the group's options (--verbose, --max-pixels, --max-bytes) set for the command of
# this invocation; typer does not keep click's context stack, and the library never
# reads this: commands pass the values on as arguments.
_GIVEN: ContextVar[dict | None] = ContextVar("ctedge_given", default=None)


def group_option(key: str, default):
    return (_GIVEN.get() or {}).get(key, default)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctedge {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
         verbose_flag: Annotated[bool, typer.Option("--verbose", help="Show TensorFlow's own start-up "
                                               "and C++ log lines (hidden by default).")] = False,
         max_pixels: Annotated[int, typer.Option(
             envvar="CTEDGE_MAX_PIXELS", help="Refuse images of more pixels than this, read from the "
             "file header before decoding (every command).")] = DEFAULT_MAX_PIXELS,
         max_bytes: Annotated[int, typer.Option(
             envvar="CTEDGE_MAX_BYTES", help="Refuse a zip entry or NIfTI volume of more bytes than this "
             "uncompressed, read from its header before inflating (--study).")] = DEFAULT_MAX_BYTES) -> None:
    """Put a chest-CT COVID-19 classifier onto edge hardware."""
    from ctedge.core.limits import check_budgets

    try:
        check_budgets(max_pixels=max_pixels, max_bytes=max_bytes)
    except CtedgeError as exc:
        raise typer.BadParameter(exc.detail, param_hint=flag(exc.param)) from None
    _GIVEN.set({"verbose": verbose_flag, "max_pixels": max_pixels, "max_bytes": max_bytes})
