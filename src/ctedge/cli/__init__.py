"""`ctedge` command line: a thin shell over the library, one module per group of commands.

A command's module is imported only when that command runs (``cli/commands.py``), and
TensorFlow only inside the commands that need it, so `predict` and `bench` run on the
base install and `ctedge --help` loads no numpy, OpenCV, pydicom or engine.
"""

from ctedge.cli.commands import app, flag

__all__ = ["app", "flag"]

if __name__ == "__main__":
    app()
