"""What every command shares: the app, consoles, and the one-line error exit."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    help="Tethered ensembles: train many small models that merge and drift, over Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr and exit non-zero; never a traceback."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
