"""The durable history: a versioned SQLite file written by the coordinator, read by anyone.

This package knows nothing of Ray or training: a writer (the coordinator's), a reader of
typed records, the schema. `ensemble.History.open` opens one offline from a run directory
or live from a running job's coordinator.
"""

from __future__ import annotations

from ensemble.history.reader import HistoryReader
from ensemble.history.records import (
    CoordinatorState,
    Decision,
    Event,
    Explanation,
    Generation,
    Lineage,
    LineageEdge,
    Metric,
    Publication,
)
from ensemble.history.retention import dropped_by_retention, parse_retention
from ensemble.history.schema import SCHEMA_VERSION, check_schema
from ensemble.history.writer import HistoryWriter

# What a live query may ask the coordinator to run on its reader.
QUERIES = frozenset(
    {
        "meta",
        "model_count",
        "decisions",
        "merges",
        "drifts",
        "publications",
        "events",
        "metrics",
        "count",
        "explain",
        "rejected",
        "undone",
        "lineage",
        "generations",
        "tethers",
    }
)

__all__ = [
    "QUERIES",
    "SCHEMA_VERSION",
    "CoordinatorState",
    "Decision",
    "Event",
    "Explanation",
    "Generation",
    "HistoryReader",
    "HistoryWriter",
    "Lineage",
    "LineageEdge",
    "Metric",
    "Publication",
    "check_schema",
    "dropped_by_retention",
    "parse_retention",
]
