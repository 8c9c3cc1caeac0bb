"""Run directories: naming, claiming, and recognising them.

runs/<job>/ holds config.yaml, history.sqlite, models/ and, once the job has finished,
summary.json. A directory without summary.json is an unfinished or interrupted run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml

from ensemble.config import Config
from ensemble.errors import RunDirError


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


def claim_run_dir(run_dir: Path, job: str) -> tuple[Path, list[Path]]:
    """Create an empty, writable run directory; refuse one that already holds a run.
    Returns it and the directories this created (for `unclaim`)."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunDirError(f"{run_dir}: a symlink to {os.readlink(run_dir)}, which does not exist")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        other = recorded_job(run_dir)
        what = f"job {other!r}" if other else "files"
        hint = "" if other != job else " (the same job: pick a new job name or --run-dir)"
        raise RunDirError(f"{run_dir}: already holds {what}{hint}; refusing to overwrite it")
    made, p = [], run_dir
    while not p.exists() and not p.is_symlink():
        made.append(p)
        p = p.parent
    made.reverse()  # the topmost first
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".writable"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        unclaim(run_dir, made)
        why = e.strerror or type(e).__name__
        raise RunDirError(f"{run_dir}: cannot use it as a run directory ({why})") from None
    return run_dir, made


def unclaim(run_dir: Path, made: list[Path]) -> None:
    """Undo `claim_run_dir` after a start that failed: remove what it made, or empty the
    directory it found empty."""
    if made:
        shutil.rmtree(made[0], ignore_errors=True)
    elif Path(run_dir).is_dir():
        for p in Path(run_dir).iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


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
