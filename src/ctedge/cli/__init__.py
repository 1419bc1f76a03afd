"""`ctedge` command line: a thin shell over the library, one module per group of commands.

TensorFlow is imported only inside the commands that need it, so `predict`
and `bench` run on the base install.
"""

# each module registers its commands; imported in the workflow's order, which --help keeps
from ctedge.cli import train, evaluate, predict, bench, serve  # noqa: I001, F401
from ctedge.cli.common import app, flag

__all__ = ["app", "flag"]

if __name__ == "__main__":
    app()
