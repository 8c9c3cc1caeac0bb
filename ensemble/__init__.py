"""tether-ensemble: many small models that train side by side, merging and drifting.

from ensemble import Job, History, Ensemble
"""

from __future__ import annotations

__all__ = ["Ensemble", "History", "Job", "JobResult"]


def __getattr__(name: str):
    # Lazy: `ensemble --help` must not pay for torch and Ray.
    if name in ("History", "Job", "JobResult"):
        from ensemble import api

        return getattr(api, name)
    if name == "Ensemble":
        from ensemble.outputs.inference import Ensemble

        return Ensemble
    raise AttributeError(f"module 'ensemble' has no attribute {name!r}")
