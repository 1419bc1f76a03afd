"""Lint for src/ctedge/cli: the CLI only parses, calls the library and prints.

Fails (exit 1, one line per finding: file:line) on a numeric comparison (a
threshold belongs in the library), verdict text the library owns, or a bare exit
code (``typer.Exit(3)``: codes come from ``ExitCode``).

    python scripts/check_cli_source.py [CLI_DIR]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CLI = Path(__file__).resolve().parent.parent / "src" / "ctedge" / "cli"
VERDICTS = ("SHORTCUT", "effectively constant", "leakage:", "OVER", "beyond its tolerance", "timing noise",
            "not comparable", "target <= 1")


def _number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def findings(path: Path) -> list[str]:
    """What the CLI module at ``path`` should not hold."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Compare) and any(map(_number, (node.left, *node.comparators))):
            found.append(f"{path}:{node.lineno}: numeric comparison {ast.unparse(node)!r}: thresholds "
                         "belong in the library")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "Exit"
              and node.args and _number(node.args[0])):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}: exit codes come from ExitCode")
    for number, line in enumerate(source.splitlines(), 1):
        found += [f"{path}:{number}: {phrase!r}: verdict text belongs in the library"
                  for phrase in VERDICTS if phrase in line]
    return found


def main(folder: Path = CLI) -> int:
    problems = [problem for path in sorted(folder.glob("*.py")) for problem in findings(path)]
    print("\n".join(problems) or f"{folder}: no thresholds, verdicts or bare exit codes")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else CLI))
