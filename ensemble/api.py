"""The Python API: launch a job, open a history (offline or live).

    from ensemble import Job
    result = Job("configs/default.yaml", ["data.partition=dirichlet"]).run()

    from ensemble import History
    h = History.open("runs/<job>")                 # offline, from a run directory
    h = History.open(("127.0.0.1:6379", "<job>"))  # live, asks the running coordinator
    h.merges(model=3); h.lineage(3); h.tethers(3, generation=4); h.explain(id)

Both return the same typed records: the live coordinator answers from the same file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ensemble.config import Config
from ensemble.errors import ConfigError
from ensemble.history import HistoryReader
from ensemble.runtime.rundir import open_run_dir


class History:
    @staticmethod
    def open(source: str | Path | tuple[str, str]):
        """A run directory (offline) or an (address, job) pair (live)."""
        if isinstance(source, tuple):
            from ensemble.runtime.service import LiveHistory, find_coordinator

            address, job = source
            return LiveHistory(find_coordinator(address, job))
        return HistoryReader(open_run_dir(source) / "history.sqlite")


@dataclass(frozen=True)
class JobResult:
    """A finished job: its summary (what `ensemble run` prints), run directory, history
    and trained ensemble."""

    summary: dict
    run_dir: Path

    @property
    def history(self) -> HistoryReader:
        return History.open(self.run_dir)

    @property
    def ensemble(self):
        from ensemble.outputs.inference import Ensemble

        return Ensemble.load(self.run_dir)


class Job:
    """An ensemble job, launched from Python:

        from ensemble import Job
        result = Job("configs/default.yaml", ["models.count=4"]).run()
        result.summary["ensemble"]; result.history.merges(); result.ensemble.predict(x)

    config: a YAML path, a Config, a dict of config keys (over the built-in defaults), or
    None (the default job, as `ensemble run` runs it);
    overrides: `--set`-style "dotted.key=value" strings. run() trains on a local Ray
    instance (the default), on the cluster at `address`, or with local=True in this process
    (no Ray: one stack per group of models, the synchronous protocol; the same ensemble as a
    Ray job in coordinator.mode sync). Results go to run_dir (default runs/<job>).
    """

    def __init__(
        self,
        config: str | Path | dict | Config | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        run_dir: str | Path | None = None,
    ):
        from ensemble.config import load_config
        from ensemble.runtime.job import check
        from ensemble.runtime.rundir import resolve_job

        if config is None:  # the default job, as `ensemble run` runs it
            from ensemble.jobs import DEFAULT

            config = DEFAULT
        if isinstance(config, Config):
            cfg = load_config(None, list(overrides), base=config.model_dump(mode="json"))
        elif isinstance(config, dict):
            cfg = load_config(None, list(overrides), base=config)
        else:
            cfg = load_config(config, list(overrides))
        self.cfg = resolve_job(check(cfg))
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / self.cfg.job

    def run(
        self,
        local: bool = False,
        address: str | None = None,
        on_progress: Callable[[dict], None] | None = None,
    ) -> JobResult:
        """Train to the end; on_progress gets the coordinator's progress while it runs."""
        if local:
            if address is not None:
                raise ConfigError("Job.run: local=True runs without Ray; drop address")
            from ensemble.runtime.job import run_local

            summary = run_local(self.cfg, self.run_dir, on_progress=on_progress)
        else:
            from ensemble.runtime.cluster import ray_env

            ray_env(address)  # before Ray is imported: loopback for a private instance
            from ensemble.runtime.driver import run_job

            summary = run_job(self.cfg, self.run_dir, address, on_progress=on_progress)
        return JobResult(summary, self.run_dir)
