"""`ensemble run`: train an ensemble with a live progress display and a summary."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from ensemble.cli.common import app, console, fail
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
    for m in s.get("failed", []):
        t.add_row(str(m), *blank[: len(blank) - 1], "[red]failed", "")
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
    groups = s.get("groups") or {}
    found = groups.get("found")
    t.caption = (
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
    return t


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
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue an interrupted job from this run directory's checkpoints and history"
        ),
    ] = None,
) -> None:
    """Train an ensemble: start (or join) Ray, coordinate merges and drifts, print a summary."""
    from ensemble.cluster import ray_env
    from ensemble.job import load as load_config
    from ensemble.rundir import open_run_dir, resolve_job

    try:
        if resume is not None:
            if config is not None or set_ or run_dir is not None:
                fail(
                    "--resume takes the job's own config from the run directory; "
                    "drop CONFIG, --set and --run-dir"
                )
            cfg = load_config(open_run_dir(resume) / "config.yaml", saved=True)
        else:
            cfg = resolve_job(load_config(config or default_config(), set_ or []))
    except EnsembleError as e:
        fail(str(e))
    ray_env(address)  # before Ray is imported
    from functools import partial

    from ensemble.driver import run_job

    target = resume or run_dir or Path("runs") / cfg.job
    run_job = partial(run_job, resume=resume is not None)
    try:
        with ray_log(target):  # Ray's own lines go to <run dir>/driver.log, not the screen
            if quiet:
                summary = run_job(cfg, target, address)
            elif not console.is_terminal:  # a pipe or a file: plain lines, as they happen
                lines = PlainProgress(cfg.job, cfg.train.epochs)
                summary = run_job(
                    cfg, target, address, on_progress=lines.progress, on_status=lines.status
                )
            else:
                with Live(console=console, refresh_per_second=4, transient=True) as live:
                    shown: dict = {"status": "", "table": None}

                    def show(**kw):
                        shown.update(kw)
                        table = [shown["table"]] if shown["table"] is not None else []
                        live.update(Group(Spinner("dots", text=shown["status"]), *table))

                    summary = run_job(
                        cfg,
                        target,
                        address,
                        on_progress=lambda p: show(table=progress_table(p, cfg.train.epochs)),
                        on_status=lambda message: show(status=f"{cfg.job}: {message}"),
                    )
    except EnsembleError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"interrupted; what was recorded is in {target}/history.sqlite", code=130)
    console.print(summary_table(summary))
    console.print(f"run directory: {target}")


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
def ray_log(run_dir: Path):
    """While the job runs, what reaches this process's stderr (Ray's C++ warnings, workers'
    forwarded output) goes to a file; then into <run dir>/driver.log, or away if the start
    failed and left no run directory. Our own error lines are printed after, on stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile(prefix="ensemble-driver-", suffix=".log", delete=False) as f:
        log = Path(f.name)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        dest = Path(run_dir) / "driver.log"
        if Path(run_dir).is_dir() and log.stat().st_size:
            with open(dest, "ab") as out:
                out.write(log.read_bytes())
        log.unlink(missing_ok=True)


def default_config() -> Path:
    """The default job (ensemble/jobs/default.yaml, which configs/default.yaml links to),
    shipped with the package so `ensemble run` runs it anywhere."""
    from ensemble.jobs import DEFAULT

    return DEFAULT
