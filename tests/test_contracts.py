"""The architecture's import contracts (pyproject.toml, [tool.importlinter]): the layers,
the TensorFlow-free edge and core, engine libraries only in their engine modules, the
study readers without an import cycle. One definition, checked by import-linter over
every import, function-level ones too."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.stdout.count("KEPT") == 4, result.stdout
