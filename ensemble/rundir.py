"""Run directories: naming, claiming, and recognising them.

runs/<job>/ holds config.yaml, history.sqlite, models/ and, once the job has finished,
summary.json. A directory without summary.json is an unfinished or interrupted run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

from ensemble.config import Config
from ensemble.errors import RunDirError


def local_ray_env() -> None:
    """Make a local Ray instance bind to 127.0.0.1. Must run before `import ray`."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before local_ray_env(); it would bind widely")


def resolve_job(cfg: Config) -> Config:
    """Give an unnamed job the name '<data>-<YYYYmmdd-HHMMSS>'."""
    if cfg.job:
        return cfg
    return cfg.model_copy(update={"job": f"{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"})


def recorded_job(run_dir: Path) -> str | None:
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        return (yaml.safe_load(cfg.read_text()) or {}).get("job")
    except yaml.YAMLError:
        return None


def claim_run_dir(run_dir: Path, job: str) -> Path:
    """Create an empty run directory; refuse one that already holds a run."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        other = recorded_job(run_dir)
        what = f"job {other!r}" if other else "files"
        hint = "" if other != job else " (the same job: pick a new job name or --run-dir)"
        raise RunDirError(f"{run_dir}: already holds {what}{hint}; refusing to overwrite it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def open_run_dir(path: str | Path) -> Path:
    """A run directory for reading: it must exist and hold a history."""
    p = Path(path)
    if not p.exists():
        raise RunDirError(f"{p}: run directory does not exist")
    if not p.is_dir():
        raise RunDirError(f"{p}: not a directory")
    if not (p / "history.sqlite").is_file():
        raise RunDirError(f"{p}: not a run directory (no history.sqlite)")
    return p


def check_resumable(run_dir: Path, job: str) -> Path:
    """A run directory that `--resume` can continue: the same job, not finished."""
    run_dir = open_run_dir(run_dir)
    other = recorded_job(run_dir)
    if other != job:
        raise RunDirError(f"{run_dir}: holds job {other!r}, not {job!r}")
    if (run_dir / "summary.json").exists():
        raise RunDirError(f"{run_dir}: job {job!r} already finished (summary.json exists)")
    return run_dir


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
