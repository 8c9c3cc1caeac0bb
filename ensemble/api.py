"""The Python API: open a history, offline or live.

    from ensemble import History
    h = History.open("runs/<job>")                 # offline, from a run directory
    h = History.open(("127.0.0.1:6379", "<job>"))  # live, asks the running coordinator
    h.merges(model=3); h.lineage(3); h.tethers(3, generation=4); h.explain(id)

Both return the same typed records: the live coordinator answers from the same file.
"""

from __future__ import annotations

from pathlib import Path

from ensemble.history import HistoryReader
from ensemble.rundir import open_run_dir


class History:
    @staticmethod
    def open(source: str | Path | tuple[str, str]):
        """A run directory (offline) or an (address, job) pair (live)."""
        if isinstance(source, tuple):
            from ensemble.service import LiveHistory, find_coordinator

            address, job = source
            return LiveHistory(find_coordinator(address, job))
        return HistoryReader(open_run_dir(source) / "history.sqlite")
