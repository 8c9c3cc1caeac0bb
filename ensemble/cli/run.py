"""`ensemble run`: train an ensemble with a live progress display and a summary."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table

from ensemble.cli.common import app, console, err, fail
from ensemble.errors import EnsembleError

MAX_ROWS = 16  # beyond this many models, tables summarise the population


def progress_table(p: dict, epochs: int) -> Table:
    t = Table(
        title=f"round {p['rounds']}   merges kept {p['merges_kept']} of {p['merges']}   "
        f"drifts {p['drifts']}   "
        f"publications {p['publications']}",
        title_justify="left",
    )
    for col in ("model", "epoch", "step", "loss", "val acc", "state"):
        t.add_column(col, justify="right")
    models = p["models"]
    if len(models) > MAX_ROWS:  # thousands of models: one line for the whole population
        ep = [min(m["epoch"] + 1, epochs) for m in models]
        steps = [m["step"] for m in models]
        running = sum(m["active"] for m in models)
        t.add_row(
            f"all {len(models)}",
            f"{min(ep)}..{max(ep)}/{epochs}",
            f"{min(steps)}..{max(steps)}",
            f"{sum(m['loss'] for m in models) / len(models):.4f} mean",
            f"{sum(m['val_acc'] for m in models) / len(models):.3f} mean",
            f"{running} running",
        )
        return t
    for m in models:
        t.add_row(
            str(m["model"]),
            f"{min(m['epoch'] + 1, epochs)}/{epochs}",
            str(m["step"]),
            f"{m['loss']:.4f}",
            f"{m['val_acc']:.3f}",
            "running" if m["active"] else "done",
        )
    return t


def summary_table(s: dict) -> Table:
    differ = s.get("differ", False)  # members' data differ: personal scores beside global
    t = Table(
        title=f"job {s['job']}: {s['models']} models on {s['data']}, policy {s.get('policy')} "
        f"({s['test_samples']} global test samples)",
        title_justify="left",
    )
    cols = ["member", *(["group"] if any("group" in m for m in s["members"]) else [])]
    cols += ["global acc", "global NLL", "personal acc", "personal NLL"] if differ else []
    cols += [] if differ else ["test accuracy", "test NLL"]
    for col in [*cols, "steps"]:
        t.add_column(col, justify="right")
    members = s["members"]
    if len(members) > MAX_ROWS:  # the best and the worst; every member is in summary.json
        key = "personal_nll" if differ else "nll"
        ranked = sorted(members, key=lambda m: m[key])
        half = MAX_ROWS // 2
        members = [*ranked[:half], None, *ranked[-half:]]
    blank = [""] * (len(cols) - 1)
    for m in members:
        if m is None:
            t.add_row(f"… {len(s['members']) - 2 * half} more", *blank, "")
            continue
        row = [str(m["model"]), *([str(m.get("group", ""))] if "group" in cols else [])]
        row += [f"{m['accuracy']:.4f}", f"{m['nll']:.4f}"]
        row += [f"{m['personal_accuracy']:.4f}", f"{m['personal_nll']:.4f}"] if differ else []
        t.add_row(*row, str(m["steps"]))
    t.add_section()
    pad = [""] * ("group" in cols)
    mean, ens, own = s["mean_member"], s["ensemble"], s.get("personal") or {}
    t.add_row(
        "mean member",
        *pad,
        f"{mean['accuracy']:.4f}",
        f"{mean['nll']:.4f}",
        *([f"{own['accuracy']:.4f}", f"{own['nll']:.4f}"] if differ else []),
        "",
    )
    galaxy = own.get("group_ensemble")  # each member's group's ensemble, on its own rows
    t.add_row(
        "[bold]ensemble",
        *pad,
        f"[bold]{ens['accuracy']:.4f}",
        f"[bold]{ens['nll']:.4f}",
        *(
            [f"[bold]{galaxy['accuracy']:.4f}", f"[bold]{galaxy['nll']:.4f}"]
            if differ and galaxy
            else ["", ""]
            if differ
            else []
        ),
        "",
    )
    t.caption = summary_caption(s, differ, bool(galaxy))
    return t


def summary_caption(s: dict, differ: bool, galaxy: bool) -> str:
    """Under the summary table: failures, counts, the groups found, and what global and
    personal mean."""
    groups = s.get("groups") or {}
    found = groups.get("found")
    failed = "".join(  # not in the ensemble: say so, and why, at the table's full width
        f"[red]member {f['model']} failed: {escape(f['reason'][:200])}[/]\n"
        for f in s.get("failed", [])
    )
    return failed + (
        f"merges kept {s['merges']} of {s['merges_attempted']}"
        + (f" ({s['rejected']} rejected)" if s.get("rejected") else "")
        + f"   drifts {s['drifts']}   rounds {s['rounds']}   "
        f"wall {s['wall_seconds']:.1f}s"
        + (f"\ngroups found: {len(found)}" if found else "")
        + (
            f" (ARI {groups['ari']:.2f} against the data's)"
            if groups.get("ari") is not None
            else ""
        )
        + (
            "\ntest: global, the whole test split as every group has it; personal, each "
            "member on its own test rows (mean member: the mean of those"
            + ("; ensemble: each member's group's ensemble on them)" if galaxy else ")")
            if differ
            else ""
        )
    )


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config; omit for the default job")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key, e.g. --set models.count=6 (repeatable)"),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Join this Ray cluster (host:port) instead of starting a local one"),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Where results go [default: runs/<job>]")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No live progress display")] = False,
    verbose: Annotated[
        bool, typer.Option(help="Also say where the wall time went (summary.json `phases`)")
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue an interrupted job from this run directory's checkpoints and history"
        ),
    ] = None,
    trust_code: Annotated[
        bool,
        typer.Option(
            help="With --resume: import the factory code the run directory's config names "
            "even if it is not the code this machine trained that run with"
        ),
    ] = False,
) -> None:
    """Train an ensemble: start (or join) Ray, coordinate merges and drifts, print a summary.

    Exit status: 0 when every member finished; 3 when the job finished but some members
    failed (the table and summary.json `failed` name them and why; the ensemble is the
    rest); 2 for bad input or a job that could not run; 130 when interrupted."""
    from ensemble.runtime.cluster import ray_env

    cfg = job_config(config, set_, resume, run_dir, trust_code)
    ray_env(address)  # before Ray is imported
    target = resume or run_dir or Path("runs") / cfg.job
    try:
        with OneInterrupt(), ray_log(target, cfg.job, quiet):  # Ray's lines: <run dir>/driver.log
            summary = train(cfg, target, address, quiet, resume is not None)
    except EnsembleError as e:
        fail(str(e))
    except KeyboardInterrupt:
        kept = Path(target) / "history.sqlite"
        fail(
            f"interrupted; what was recorded is in {kept}"
            if kept.is_file()
            else "interrupted before anything was recorded; no run directory left",
            code=130,
        )
    console.print(summary_table(summary))
    if verbose and summary.get("phases"):
        console.print(phases_line(summary["phases"]))
    console.print(f"run directory: {target}")
    if summary["failed"]:
        n = len(summary["failed"])
        err.print(
            f"{n} of {summary['models']} members failed (see above and summary.json "
            "`failed`); the ensemble is the rest: exit status 3",
            highlight=False,
        )
        raise typer.Exit(3)


def job_config(config, set_, resume, run_dir, trust_code):
    """The job's config: the run directory's own (--resume, its code checked), or CONFIG
    (the default job when omitted) with --set applied."""
    from ensemble.runtime import trust
    from ensemble.runtime.job import load as load_config
    from ensemble.runtime.rundir import open_run_dir, resolve_job

    try:
        if resume is not None:
            if config is not None or set_ or run_dir is not None:
                fail(
                    "--resume takes the job's own config from the run directory; "
                    "drop CONFIG, --set and --run-dir"
                )
            cfg = load_config(open_run_dir(resume) / "config.yaml", saved=True)
            trust.check(cfg, resume, trust_code)
            return cfg
        if trust_code:
            fail("--trust-code is for --resume (a new job runs the code you give it)")
        return resolve_job(load_config(config or default_config(set_ or []), set_ or []))
    except EnsembleError as e:
        fail(str(e))


def train(cfg, target: Path, address: str | None, quiet: bool, resume: bool) -> dict:
    """Run the job, showing its progress: a live table on a terminal, plain lines on a pipe
    or file, nothing with --quiet. Returns the summary."""
    from functools import partial

    from ensemble.runtime.driver import run_job

    run_job = partial(run_job, cfg, target, address, resume=resume)
    if quiet:
        return run_job()
    if not console.is_terminal:  # a pipe or a file: plain lines, as they happen
        lines = PlainProgress(cfg.job, cfg.train.epochs)
        return run_job(on_progress=lines.progress, on_status=lines.status)
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        shown: dict = {"status": "", "table": None}

        def show(**kw):
            shown.update(kw)
            table = [shown["table"]] if shown["table"] is not None else []
            live.update(Group(Spinner("dots", text=shown["status"]), *table))

        return run_job(
            on_progress=lambda p: show(table=progress_table(p, cfg.train.epochs)),
            on_status=lambda message: show(status=f"{cfg.job}: {message}"),
        )


class OneInterrupt:
    """The first Ctrl-C stops the job (KeyboardInterrupt); any later one is ignored, so
    the cleanup (stopping workers, closing the history, stopping Ray) runs to its end and
    the exit status is 130, however often the key is pressed."""

    def __enter__(self):
        self.saved = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._first)
        return self

    def _first(self, signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    def __exit__(self, kind, exc, tb):
        if kind is None:  # no interrupt: Ctrl-C does what it did before
            signal.signal(signal.SIGINT, self.saved)


def phases_line(phases: dict) -> str:
    """Where the wall time went, in one line: each phase's seconds, in order."""
    parts = [f"{k.replace('_', ' ')} {v:.2f}s" for k, v in phases.items() if k != "total"]
    return f"phases: {', '.join(parts)}; total {phases.get('total', 0):.2f}s"


class PlainProgress:
    """Progress for output that is not a terminal: a line per phase, and one per epoch
    (the slowest model's), with rounds, merges and drifts so far."""

    def __init__(self, job: str, epochs: int):
        self.job, self.epochs, self.epoch = job, epochs, -1

    def status(self, message: str) -> None:
        print(f"{self.job}: {message}", flush=True)

    def progress(self, p: dict) -> None:
        epoch = min((m["epoch"] for m in p["models"] if m["active"]), default=self.epochs)
        if epoch > self.epoch:
            self.epoch = epoch
            print(
                f"{self.job}: epoch {min(epoch + 1, self.epochs)}/{self.epochs}  rounds "
                f"{p['rounds']}  merges kept {p['merges_kept']} of {p['merges']}  drifts "
                f"{p['drifts']}  publications "
                f"{p['publications']}",
                flush=True,
            )


@contextmanager
def ray_log(run_dir: Path, job: str, quiet: bool = False):
    """While the job runs, what reaches this process's stderr (Ray's C++ warnings, workers'
    forwarded output; with `quiet`, its stdout too) goes to an unnamed temporary file (one
    a kill cannot leave behind); then into <run dir>/driver.log when the run directory
    holds this job (not when the start failed, nor another job that owns it), or away. Our
    own error lines are printed after, on stderr."""
    from ensemble.runtime.rundir import recorded_job

    fds = (1, 2) if quiet else (2,)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    log = tempfile.TemporaryFile(prefix="ensemble-driver-", suffix=".log")
    for fd in fds:
        os.dup2(log.fileno(), fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in saved.items():
            os.dup2(old, fd)
            os.close(old)
        run = Path(run_dir)
        if log.tell() and recorded_job(run) == job:
            log.seek(0)
            with open(run / "driver.log", "ab") as out:
                shutil.copyfileobj(log, out)
        log.close()


OWN_DATA = ("data.name", "data.path", "data.x_path", "data.factory")  # a user's own data


def default_config(overrides: list[str] = ()) -> Path | None:
    """The default job (ensemble/jobs/default.yaml, which configs/default.yaml links to),
    shipped with the package so `ensemble run` runs it anywhere. Its sites are digits':
    overrides that name other data (data.path, data.name, ...) start from the built-in
    defaults instead (None)."""
    from ensemble.jobs import DEFAULT

    keys = [o.partition("=")[0].strip() for o in overrides]
    return None if any(k in OWN_DATA for k in keys) else DEFAULT
