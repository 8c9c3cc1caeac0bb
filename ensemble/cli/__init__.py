"""The `ensemble` command line: one typer app, commands grouped by concern."""
# isort: skip_file

from ensemble.cli.common import app
from ensemble.cli import run  # noqa: F401  registers `run` first, so --help lists it first
from ensemble.cli import query  # noqa: F401  history, lineage, tethers
from ensemble.cli import results  # noqa: F401  plot, eval, predict, export
from ensemble.cli import jobs  # noqa: F401  submit, logs, stop, status, cluster

__all__ = ["app"]
