"""The durable history: a versioned SQLite file written by the coordinator, read by anyone.

    History.open("runs/<job>")                 # offline, from a run directory
    History.open(("127.0.0.1:6379", "<job>"))  # live, asks the running coordinator
    h.merges(model=3); h.lineage(3); h.tethers(3, generation=4); h.explain(id)

Both return the same typed records: the live coordinator answers from the same file.
"""

from __future__ import annotations

from pathlib import Path

from ensemble.history.reader import HistoryReader
from ensemble.history.records import (
    Decision,
    Event,
    Explanation,
    Generation,
    Lineage,
    LineageEdge,
    Metric,
    Publication,
)
from ensemble.history.schema import SCHEMA_VERSION, check_schema
from ensemble.history.writer import HistoryWriter, parse_retention

# What a live query may ask the coordinator to run on its reader.
QUERIES = frozenset(
    {
        "meta",
        "decisions",
        "merges",
        "drifts",
        "publications",
        "events",
        "metrics",
        "count",
        "explain",
        "lineage",
        "generations",
        "tethers",
    }
)

__all__ = [
    "QUERIES",
    "SCHEMA_VERSION",
    "Decision",
    "Event",
    "Explanation",
    "Generation",
    "History",
    "HistoryReader",
    "HistoryWriter",
    "Lineage",
    "LineageEdge",
    "Metric",
    "Publication",
    "check_schema",
    "parse_retention",
]


class LiveHistory:
    """Forwards each query to the running coordinator actor of a job."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name: str):
        if name not in QUERIES:
            raise AttributeError(name)
        import ray

        from ensemble.service import unwrap

        return lambda *args, **kwargs: unwrap(
            lambda: ray.get(self.actor.query.remote(name, *args, **kwargs))
        )

    def close(self):
        pass


class History:
    @staticmethod
    def open(source: str | Path | tuple[str, str]) -> HistoryReader | LiveHistory:
        """A run directory (offline) or an (address, job) pair (live)."""
        if isinstance(source, tuple):
            from ensemble.service import find_coordinator

            address, job = source
            return LiveHistory(find_coordinator(address, job))
        from ensemble.rundir import open_run_dir

        return HistoryReader(open_run_dir(source) / "history.sqlite")
