"""A past commit's ctedge beside today's (``--baseline REV``): its ``src/`` exported by
``git archive`` into the work folder and run by this same Python and packages through
PYTHONPATH, so a figure and its baseline come from one machine in one run (machines
here differ by 2x from day to day; a target measured elsewhere is only comparable so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def baseline_env(rev: str, work: Path) -> tuple[str, dict[str, str]]:
    """(the short commit, the environment whose ``python -m ctedge`` is that commit's)."""
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"], capture_output=True,
                           text=True)
    if found.returncode != 0:
        raise SystemExit(f"--baseline {rev}: not a commit of {REPO} ({found.stderr.strip()})")
    commit = found.stdout.strip()
    tree = (work / f"src-{commit}").resolve()
    if not (tree / "ctedge").is_dir():
        partial = tree.with_name(tree.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(partial), "--strip-components=1"], input=archive.stdout, check=True)
        partial.rename(tree)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run([sys.executable, "-c", "import ctedge; print(ctedge.__file__)"], env=env,
                           capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(tree)):  # an install that shadows PYTHONPATH would time today's code twice
        raise SystemExit(f"--baseline {rev}: `import ctedge` found {where or 'nothing'}, not {tree}")
    return commit, env
