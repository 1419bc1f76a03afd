"""Start-up: each command imports only what it uses. A fresh `ctedge --help` and the
edge `predict` paths (an image, a study) are run under ``python -X importtime`` and the
heavy packages they load are held to a budget (which may appear, not how long they take:
times are benchmarks/startup_speed.py's). The command table that lets `ctedge --help`
list commands without importing them is checked against the commands themselves."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import cv2
import numpy as np
import typer

from ctedge.cli.commands import COMMANDS, LazyCommands, registry
from ctedge.core.phantom_studies import write_study
from helpers import gray_image

# packages that cost tens of milliseconds or more to import, or that an edge box may lack
HEAVY = {"numpy", "cv2", "PIL", "pydicom", "nibabel", "onnxruntime", "openvino", "tensorflow", "keras", "tf2onnx",
         "onnx", "sklearn", "scipy", "matplotlib", "pandas", "h5py", "fastapi", "uvicorn", "pynetdicom",
         "highdicom", "ray", "dicomweb_client", "requests", "pydantic", "markdown_it"}
# ctedge packages only other commands need
OTHER_COMMANDS = ("ctedge.training", "ctedge.evaluation", "ctedge.demo", "ctedge.edge.serve", "ctedge.edge.bench",
                  "ctedge.cli.train", "ctedge.cli.evaluate", "ctedge.cli.bench", "ctedge.cli.serve")


def imported(*args: str) -> set[str]:
    """Every module a fresh `ctedge ARGS` process imports (python -X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "ctedge", *args], capture_output=True,
                          text=True)
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-2000:]
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.M))


def packages(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_help_imports_no_heavy_package():
    """Nor any command's module, the option groups or the engines: the listing is the table's."""
    modules = imported("--help")
    assert packages(modules) & HEAVY == set()
    assert not [m for m in modules if m.startswith(OTHER_COMMANDS + ("ctedge.cli.predict", "ctedge.cli.common",
                                                                    "ctedge.edge"))]


def test_the_edge_predict_paths_import_their_engine_and_no_more(tmp_path, model):
    """An image: numpy, OpenCV and onnxruntime (no pydicom: it is no DICOM). A study:
    pydicom too (with what pydicom 3 imports itself). Never TensorFlow, scikit-learn,
    OpenVINO (not asked for) or another command's modules."""
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), gray_image(40))
    write_study(tmp_path / "study", np.random.default_rng(0), True, slices=4, size=32)
    study = {"numpy", "cv2", "onnxruntime", "pydicom", "PIL", "requests"}  # pydicom 3 imports PIL and requests itself
    for args, allowed in (((str(model), str(image)), {"numpy", "cv2", "onnxruntime"}),
                          ((str(model), str(tmp_path / "study"), "--study"), study)):
        modules = imported("predict", *args, "--runtime", "onnxruntime")
        assert packages(modules) & HEAVY == allowed, args
        assert not [m for m in modules if m.startswith(OTHER_COMMANDS)], args


def test_the_command_table_matches_the_commands():
    """Every command is in the table with the module that defines it, in the table's
    order; the line `ctedge --help` shows opens the command's own help."""
    for module in dict.fromkeys(module for module, _ in COMMANDS.values()):
        importlib.import_module(module)
    built = typer.main.get_command(registry)
    assert list(built.commands) and set(built.commands) == set(COMMANDS)
    for name, (module, summary) in COMMANDS.items():
        command = built.commands[name]
        assert command.callback.__module__ == module, name
        assert " ".join(command.help.split()).startswith(summary), name
    assert isinstance(typer.main.get_command(__import__("ctedge.cli").cli.app), LazyCommands)
