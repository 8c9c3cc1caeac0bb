"""Job submission through Ray's Jobs API (`JobSubmissionClient`): submit, list, logs, stop.

The config is validated here first, then shipped in the job's runtime_env working_dir; the
entrypoint is `ensemble run config.yaml --address auto`, on the cluster. `ship_package`
also ships this package (for clusters whose image does not have it installed).
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

from ensemble.config import Config, dump_config
from ensemble.errors import EnsembleError
from ensemble.runtime.cluster import jobs_client as client


def submit(cfg: Config, address: str, run_dir: Path, ship_package: bool = False) -> str:
    """Submit the job; returns its submission id (the job name)."""
    work = Path(tempfile.mkdtemp(prefix="ensemble-submit-"))
    (work / "config.yaml").write_text(dump_config(cfg))
    runtime_env = job_env(work, ship_package)
    entrypoint = (
        f"ensemble run config.yaml --address auto --quiet --run-dir {shlex.quote(str(run_dir))}"
    )
    c = client(address)
    try:
        return c.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=cfg.job,
            metadata={"app": "tether-ensemble"},
        )
    except Exception as e:
        raise EnsembleError(f"the Jobs API refused job {cfg.job!r}: {e}") from None


def job_env(work: Path, ship_package: bool) -> dict:
    """The job's Ray runtime env: its working dir, and with `ship_package` this package's
    own source (ensemble/, the worker actor included) for a cluster that lacks it."""
    env: dict = {"working_dir": str(work)}
    if ship_package:
        env["py_modules"] = [str(Path(__file__).resolve().parents[1])]
    return env


def jobs(address: str) -> list[dict]:
    out = []
    for j in client(address).list_jobs():
        if (j.metadata or {}).get("app") != "tether-ensemble":
            continue
        out.append(
            {
                "job": j.submission_id,
                "status": str(j.status.value),
                "start": j.start_time,
                "end": j.end_time,
                "message": j.message or "",
            }
        )
    return sorted(out, key=lambda j: j["start"] or 0)


def logs(address: str, job: str) -> str:
    try:
        return client(address).get_job_logs(job)
    except RuntimeError as e:
        raise EnsembleError(f"no job {job!r} at {address}: {e}") from None


def stop(address: str, job: str) -> bool:
    try:
        return client(address).stop_job(job)
    except RuntimeError as e:
        raise EnsembleError(f"no job {job!r} at {address}: {e}") from None


def follow(address: str, job: str, write) -> str:
    """Stream the job's driver output to `write` until the job ends; its final status."""
    import asyncio

    c = client(address)

    async def tail():
        async for chunk in c.tail_job_logs(job):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as e:
        raise EnsembleError(f"no job {job!r} at {address}: {e}") from None
    return wait(address, job)


def wait(address: str, job: str, timeout: float = 600.0) -> str:
    """Block until the job ends; returns its final status."""
    import time

    c = client(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = str(c.get_job_status(job).value)
        if s in ("SUCCEEDED", "FAILED", "STOPPED"):
            return s
        time.sleep(1.0)
    raise EnsembleError(f"job {job!r} still running after {timeout:g}s")
