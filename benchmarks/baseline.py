"""A past commit's ctedge beside today's (``--baseline REV``): its ``src/`` (or its whole
tree, for the test suite) exported by ``git archive`` into the work folder and run by
this same Python and packages through PYTHONPATH, so a figure and its baseline come from
one machine in one run (machines here differ by 2x from day to day; a target measured
elsewhere is only comparable so).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit_of(rev: str) -> str:
    """The short commit ``rev`` names in this repository."""
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"], capture_output=True,
                           text=True)
    if found.returncode != 0:
        raise SystemExit(f"{rev}: not a commit of {REPO} ({found.stderr.strip()})")
    return found.stdout.strip()


def exported(commit: str, work: Path, path: str | None = None) -> Path:
    """``commit``'s ``path`` (None: its whole tree) as files under ``work``, exported once."""
    tree = (work / f"{path or 'tree'}-{commit}").resolve()
    if not tree.is_dir():
        partial = tree.with_name(tree.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, *([path] if path else [])],
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(partial), *(["--strip-components=1"] if path else [])],
                       input=archive.stdout, check=True)
        partial.rename(tree)
    return tree


def with_bytecode(src: Path | None = None) -> None:
    """Write the bytecode of the code under ``src`` (None: the installed ctedge), as a pip
    install has it: with PYTHONDONTWRITEBYTECODE set, as on the machines here, every fresh
    process would compile ctedge from source again (tens of ms of each start-up figure)."""
    if src is None:
        src = Path(importlib.util.find_spec("ctedge").origin).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True)  # -q: only its errors


def code_env(src: Path, label: str) -> dict[str, str]:
    """The environment whose ``python -m ctedge`` runs the package under ``src``, checked,
    its bytecode written."""
    with_bytecode(src)
    env = {**os.environ, "PYTHONPATH": str(src)}
    where = subprocess.run([sys.executable, "-c", "import ctedge; print(ctedge.__file__)"], env=env,
                           capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(src)):  # an install that shadows PYTHONPATH would time today's code twice
        raise SystemExit(f"{label}: `import ctedge` found {where or 'nothing'}, not {src}")
    return env


def baseline_env(rev: str, work: Path) -> tuple[str, dict[str, str]]:
    """(the short commit, the environment whose ``python -m ctedge`` is that commit's)."""
    commit = commit_of(rev)
    return commit, code_env(exported(commit, work, "src"), f"--baseline {rev}")
