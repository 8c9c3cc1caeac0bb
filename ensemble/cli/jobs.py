"""Cluster and job commands: `cluster start|stop|status`, `submit`, `logs`, `stop`, and
`status` (submitted and running jobs on a cluster)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ensemble.cli.common import app, console, fail
from ensemble.errors import EnsembleError

cluster_app = typer.Typer(
    help="A local Ray head on this machine, loopback only.", no_args_is_help=True
)
app.add_typer(cluster_app, name="cluster")

JobsAddress = Annotated[
    str | None,
    typer.Option(
        help="Ray Jobs API (http://host:8265); default: the cluster `ensemble cluster start` "
        "started"
    ),
]


def jobs_address(address: str | None) -> str:
    from ensemble.runtime.cluster import default_address, ray_env

    found = address or default_address("dashboard")
    if not found:
        fail("no cluster: pass --address http://HOST:8265 or run `ensemble cluster start`")
    ray_env(found)  # before Ray is imported
    return found


@cluster_app.command("start")
def cluster_start(
    port: Annotated[int, typer.Option(help="GCS port")] = 6379,
    dashboard_port: Annotated[int, typer.Option(help="Dashboard and Jobs API port")] = 8265,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs to offer; default all")] = None,
    num_gpus: Annotated[int | None, typer.Option(help="GPUs to offer; default detected")] = None,
) -> None:
    """Start a Ray head bound to 127.0.0.1 with token auth on (a token is made if this
    machine has none); reports success once its Jobs API and job agent answer."""
    from ensemble.runtime.cluster import start

    try:
        st = start(port, dashboard_port, num_cpus, num_gpus)
    except EnsembleError as e:
        fail(str(e))
    for line in st["fixed"]:
        console.print(f"note: {line}")
    auth = (
        f"token auth on, token in {st['token_path']}"
        if st["auth"] == "token"
        else "[bold red]token auth OFF[/] (RAY_AUTH_MODE=disabled): anyone on this machine "
        "can run code through its Jobs API"
    )
    console.print(
        f"Ray head at {st['address']}, dashboard and Jobs API at {st['dashboard']} "
        f"({len(st['pids'])} processes); {auth}"
    )


@cluster_app.command("stop")
def cluster_stop() -> None:
    """Stop the head `cluster start` started: every process of it, agents included, and
    no other Ray process on the machine."""
    from ensemble.runtime.cluster import stop

    try:
        pids = stop()
    except EnsembleError as e:
        fail(str(e))
    console.print(f"stopped {len(pids)} processes")


@cluster_app.command("status")
def cluster_status() -> None:
    """Is the cluster started here running, and where."""
    from ensemble.runtime.cluster import state_file, status

    st = status()
    if not st:
        console.print(f"no cluster started here ({state_file()})")
        raise typer.Exit(1)
    up = "running" if st["alive"] else "not running (stale record)"
    console.print(
        f"{up}: {st['address']}, {st['dashboard']}, "
        f"{len(st['alive'])}/{len(st['pids'])} processes alive"
    )


@app.command()
def submit(
    config: Annotated[Path | None, typer.Argument(help="YAML config")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key")] = None,
    address: JobsAddress = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            help="Run directory as the cluster sees it (shared storage) [default: ./runs/<job>]"
        ),
    ] = None,
    ship_package: Annotated[
        bool, typer.Option(help="Ship this package in the runtime_env (image without it installed)")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Stream the job's output until it ends")
    ] = True,
) -> None:
    """Submit a job through the Ray Jobs API: prints its id (the job name), then streams
    its driver's output until it ends (exit 1 if it did not succeed); --no-wait returns."""
    from ensemble.cli.run import default_config
    from ensemble.runtime.job import load as load_config
    from ensemble.runtime.rundir import resolve_job
    from ensemble.runtime.submit import follow
    from ensemble.runtime.submit import submit as do_submit

    try:
        cfg = resolve_job(load_config(config or default_config(set_ or []), set_ or []))
        where = jobs_address(address)
        target = (run_dir or Path("runs") / cfg.job).resolve()
        job = do_submit(cfg, where, target, ship_package)
        console.print(job)
        if wait:
            final = follow(where, job, _out)
            console.print(f"{job}: {final}; run directory {target}")
            if final != "SUCCEEDED":
                raise typer.Exit(1)
    except EnsembleError as e:
        fail(str(e))


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
def logs(
    job: str,
    address: JobsAddress = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until it ends")] = False,
) -> None:
    """A submitted job's driver output (--follow: as it comes, until the job ends)."""
    from ensemble.runtime.submit import follow as follow_logs
    from ensemble.runtime.submit import logs as job_logs

    try:
        where = jobs_address(address)
        if follow:
            follow_logs(where, job, _out)
        else:
            _out(job_logs(where, job))
    except EnsembleError as e:
        fail(str(e))


@app.command()
def stop(job: str, address: JobsAddress = None) -> None:
    """Stop a submitted job."""
    from ensemble.runtime.submit import stop as job_stop

    try:
        stopped = job_stop(jobs_address(address), job)
    except EnsembleError as e:
        fail(str(e))
    console.print(f"{job}: {'stopping' if stopped else 'already ended'}")


def jobs_table(rows: list[dict], where: str) -> Table:
    t = Table(title=f"{len(rows)} submitted jobs at {where}", title_justify="left")
    for col in ("job", "status", "message"):
        t.add_column(col)
    for j in rows:
        t.add_row(j["job"], j["status"], j["message"][:60])
    return t


@app.command()
def status(
    address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS",
            help="host:port (GCS: running coordinators) or http://host:8265 (Jobs API: submitted "
            "jobs); default $RAY_ADDRESS, else the cluster `ensemble cluster start` started",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Jobs on a cluster: submitted jobs' states, and running jobs' models, steps, merges."""
    from ensemble.runtime.cluster import default_address

    gcs = dashboard = None
    if address and address.startswith("http"):
        dashboard = address
    elif address:
        gcs = address
    else:
        gcs, dashboard = default_address("gcs"), default_address("dashboard")
    if gcs or dashboard:
        from ensemble.runtime.cluster import ray_env

        ray_env(gcs or dashboard)  # before Ray is imported
    if not gcs and not dashboard:
        fail(
            "no cluster given: pass --address HOST:PORT, set RAY_ADDRESS, or run "
            "`ensemble cluster start`"
        )
    from ensemble.runtime.service import list_jobs  # Ray: only now, after ray_env
    from ensemble.runtime.submit import jobs as submitted

    try:
        running = list_jobs(gcs) if gcs else []
        queued = submitted(dashboard) if dashboard else []
    except EnsembleError as e:
        fail(str(e))
    if as_json:
        sys.stdout.write(
            json.dumps(
                running if not dashboard else {"running": running, "submitted": queued}, indent=1
            )
            + "\n"
        )
        return
    if dashboard:
        console.print(jobs_table(queued, dashboard))
    if gcs:
        console.print(running_table(running, gcs))


def running_table(jobs: list[dict], address: str) -> Table:
    t = Table(title=f"{len(jobs)} running jobs at {address}", title_justify="left")
    for col in ("job", "state", "models", "min step", "rounds", "merges", "drifts", "run dir"):
        t.add_column(col)
    for j in jobs:
        if "error" in j:
            t.add_row(j["job"], f"unreachable ({j['error']})", *[""] * 6)
            continue
        active = sum(m["active"] for m in j["models"])
        t.add_row(
            j["job"],
            f"running ({active} training)" if active else "finishing",
            str(len(j["models"])),
            str(min(m["step"] for m in j["models"])),
            str(j["rounds"]),
            str(j["merges"]),
            str(j["drifts"]),
            j["run_dir"],
        )
    return t
