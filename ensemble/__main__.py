"""`python -m ensemble`: the same CLI as the `ensemble` command."""

from ensemble.cli import app

app()
