"""``python -m ctedge``: the ``ctedge`` command, where the script is not on PATH."""

from ctedge.cli import app

if __name__ == "__main__":  # tuning's trial processes re-import the main module
    app(prog_name="ctedge")
