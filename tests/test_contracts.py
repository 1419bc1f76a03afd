"""The edge path's import contract: what the base install runs never pulls in
the training stack, checked in a fresh interpreter per module."""

import json
import subprocess
import sys

import pytest

TRAINING_STACK = ("tensorflow", "keras", "tf2onnx", "sklearn", "keras_tuner")
TRAINING_MODULES = ("ctedge.training.train", "ctedge.training.model", "ctedge.training.tuning", "ctedge.training.export",
                    "ctedge.evaluation.evaluate", "ctedge.evaluation.explain", "ctedge.evaluation.report", "ctedge.training.quiet")


@pytest.mark.parametrize("module", ["ctedge.edge.runtime", "ctedge.core.metadata", "ctedge.core.files", "ctedge.core.imageio", "ctedge.core.preprocess",
                                    "ctedge.edge.bench", "ctedge.edge.study", "ctedge.cli"])
def test_edge_modules_never_import_the_training_stack(module):
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{TRAINING_STACK!r} or m in {TRAINING_MODULES!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == [], f"{module} imports {result.stdout}"

