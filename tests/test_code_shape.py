"""The code's shape: small modules and functions, no console output or process-wide
patching in library code, and the CLI lint (scripts/check_cli_source.py)."""

import ast
import importlib.util
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ctedge"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
LIBRARY = [path for path in SRC.rglob("*.py") if "cli" not in path.relative_to(SRC).parts]


def _name(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def test_no_module_or_function_is_too_long():
    found = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.add(_name(path))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                found.add(f"{_name(path)}:{node.name}")
    assert found == set(), f"over {MAX_MODULE_LINES} lines a module, {MAX_FUNCTION_LINES} a function"


def test_library_code_never_prints_nor_patches():
    offenders = []
    for path in LIBRARY:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{_name(path)}:{node.lineno}: print()")
            if isinstance(node, ast.ImportFrom) and node.module == "ctedge.core.progress" \
                    and any(alias.name == "console" for alias in node.names):
                offenders.append(f"{_name(path)}:{node.lineno}: the CLI's console")
            if isinstance(node, (ast.Import, ast.ImportFrom)) and "unittest" in ast.unparse(node):
                offenders.append(f"{_name(path)}:{node.lineno}: unittest (mock.patch) in production code")
    assert offenders == []


def _cli_lint():
    spec = importlib.util.spec_from_file_location("check_cli_source", SCRIPTS / "check_cli_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_lint_passes_and_catches_what_it_names(tmp_path):
    lint = _cli_lint()
    assert lint.main() == 0
    (tmp_path / "bad.py").write_text("import typer\n\ndef f(x):\n    if x > 0.5:\n        raise typer.Exit(3)\n"
                                     "    return 'SHORTCUT'\n")
    found = lint.findings(tmp_path / "bad.py")
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in found] == ["4", "5", "6"]


def test_the_slowest_tests_table_names_tests_that_exist():
    """tests/slowest.py orders the run by name: a renamed or deleted test would silently
    fall out of the order (and its worker's share of slow tests)."""
    from slowest import SLOWEST

    tests = Path(__file__).resolve().parent
    missing = []
    for key in SLOWEST:
        file, _, name = key.partition("::")
        path = tests / file
        defined = {node.name for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.FunctionDef)} if path.is_file() else set()
        if not path.is_file() or (name and name not in defined):
            missing.append(key)
    assert missing == []
