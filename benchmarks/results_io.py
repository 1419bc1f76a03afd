"""Where every benchmark leaves its results: OUT.json (the figures, for tools) and OUT.md
(the table, for people), each written atomically beside the other."""

from __future__ import annotations

import json
from pathlib import Path

from ctedge.core.files import atomic_write


def write_results(out: Path, report, table: str) -> None:
    atomic_write((json.dumps(report, indent=2, default=str) + "\n").encode(), out.with_suffix(".json"))
    atomic_write(table.encode(), out.with_suffix(".md"))


def machine_sentence(report: dict) -> str:
    """The results' first words: the machine (``machine_info``) and the load around the run."""
    m = report["machine"]
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}. Load average "
            f"before {report['load_before']}, after {report['load_after']}.")
