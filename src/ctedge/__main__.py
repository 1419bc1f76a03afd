"""``python -m ctedge``: the ``ctedge`` command, where the script is not on PATH."""

from .cli import app

app(prog_name="ctedge")
