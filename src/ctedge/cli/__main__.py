"""``python -m ctedge.cli``: the same command as ``ctedge``."""

from ctedge.cli import app

if __name__ == "__main__":
    app(prog_name="ctedge")
