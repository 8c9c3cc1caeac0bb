"""What every command shares: the app, consoles, and the one-line error exit.

Every failure a user's input can cause ends the same way: one `error:` line on stderr and
exit status 2, never a traceback. Commands turn the errors they expect into that with
`fail`; the app's group (`Guarded`) does it for everything else that comes from what the
user handed in: the project's errors, OS errors on their paths, damaged SQLite files.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ensemble.errors import EnsembleError

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr, on one line, and exit non-zero; never a traceback."""
    line = escape(" ".join(str(message).split()))  # a path may hold [brackets]
    err.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def describe(e: BaseException) -> str | None:
    """The one-line message for an error a user's input caused, or None for a bug."""
    if isinstance(e, EnsembleError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not text where text was expected ({e.reason} at byte {e.start})"
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None else "a file"
        return f"{where}: {e.strerror or type(e).__name__}"
    if isinstance(e, sqlite3.DatabaseError):
        return f"the history file is damaged or not a history ({e})"
    if type(e).__name__ == "SafetensorError":
        return f"cannot read or write a safetensors file ({e})"
    return None


def output_path(path: Path, what: str = "output") -> Path:
    """A file path we may write: not a directory, in a directory that exists."""
    if path.is_dir():
        fail(f"{path}: is a directory; give a file name for the {what}")
    if not path.parent.is_dir():
        fail(f"{path}: directory {path.parent} does not exist")
    return path


def model_in_run(h, model: int) -> None:
    """Fail unless `model` is one of the run's models."""
    count = h.model_count()
    if count is not None and not 0 <= model < count:
        fail(f"--model {model}: this run has models 0..{count - 1}")


# Commands that only read a run's history: a value there that is not what this version
# writes (bad JSON, a short blob, a missing row, an integer past 2^63) is damage, not a bug.
READS_HISTORY = {"history", "lineage", "tethers", "plot"}
DAMAGE = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)


def damaged_history(args: list[str], e: BaseException) -> str | None:
    """The line for `e` raised while `ensemble ARGS` read a run's history, if it did."""
    if not args or args[0] not in READS_HISTORY or not isinstance(e, DAMAGE):
        return None
    runs = [a for a in args[1:] if (Path(a) / "history.sqlite").is_file()]
    where = f"{Path(runs[0]) / 'history.sqlite'}" if runs else "the history"
    detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return f"{where}: holds damaged or unexpected contents ({detail})"


class Guarded(TyperGroup):
    """The app's group: a user's error from any command becomes one `error:` line."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        ctx.meta["ensemble.args"] = list(args)  # the command and its arguments
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as e:
            args = ctx.meta.get("ensemble.args", [])
            message = describe(e) or damaged_history(args, e)
            if message is None:
                raise
            fail(message)


app = typer.Typer(
    cls=Guarded,
    help="Tethered ensembles: train many small models that merge and drift, over Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
