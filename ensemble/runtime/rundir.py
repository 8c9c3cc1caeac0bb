"""Run directories: naming, claiming, and recognising them.

runs/<job>/ holds config.yaml, history.sqlite, models/ and, once the job has finished,
summary.json. A directory without summary.json is an unfinished or interrupted run.
run.lock is its claim: one job at a time owns a run directory (`Claim`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from ensemble.config import Config, load_yaml, migrate
from ensemble.errors import ConfigError, RunDirError


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
        tree = load_yaml(cfg.read_text(), str(cfg)) or {}
    except (yaml.YAMLError, ConfigError, UnicodeDecodeError):
        return None
    return tree.get("job") if isinstance(tree, dict) else None


LOCK = "run.lock"  # the claim: flock'ed by the driver for the job's whole life


@dataclass
class Claim:
    """A run directory's one owner: an exclusive `flock` on <run dir>/run.lock, held by
    the driver from before anything is written until the job has ended. The kernel drops
    it when the holder exits, even by SIGKILL, so a claim whose holder is gone is stale by
    construction: the next claim simply gets the lock (run.lock's text, the holder's pid
    and host, is only for messages).

    `undo` is for a start that failed: it removes only what this start created (the
    directories it made, or the entries that were not there when it claimed the
    directory), and nothing of a resumed run."""

    run_dir: Path
    fd: int
    resumed: bool
    made: list[Path] = field(default_factory=list)  # directories it created, topmost first
    before: frozenset[str] = frozenset()  # the directory's entries when claimed

    def undo(self) -> None:
        if self.resumed:
            return
        if self.made:
            shutil.rmtree(self.made[0], ignore_errors=True)
            return
        for p in self.run_dir.iterdir():
            if p.name in self.before:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(run_dir: Path, job: str) -> int:
    """The run directory's lock, taken without waiting; refuse if a live job holds it."""
    path = run_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(
                f"{run_dir}: cannot use it as a run directory ({e.strerror or type(e).__name__})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise RunDirError(
                f"{run_dir}: in use by a job that is still running ({holder or 'unknown'}); "
                "wait for it to end, or use another --run-dir"
            ) from None
        try:  # the file we locked must still be the one at that path (a failed start
            same = os.stat(path).st_ino == os.fstat(fd).st_ino  # may have removed it)
        except FileNotFoundError:
            same = False
        if same:
            holder = f"job {job!r}, pid {os.getpid()} on {socket.gethostname()}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
            return fd
        os.close(fd)


def claim_run_dir(run_dir: Path, job: str) -> Claim:
    """Create (or take) an empty, writable run directory and hold its claim; refuse one
    that holds a run, files, or a running job."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunDirError(f"{run_dir}: a symlink to {os.readlink(run_dir)}, which does not exist")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory")
    if run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir()):
        raise _holds(run_dir, job)
    made, p = [], run_dir
    while not p.exists() and not p.is_symlink():
        made.append(p)
        p = p.parent
    made.reverse()  # the topmost first
    had_lock = (run_dir / LOCK).exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise RunDirError(f"{run_dir}: cannot use it as a run directory ({why})") from None
    try:
        fd = _lock(run_dir, job)
    except RunDirError:
        # Another start got there first: it owns what exists; take back only our own
        # directories, and only if it has not put anything in them.
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    before = frozenset(p.name for p in run_dir.iterdir())
    if before - {LOCK}:  # filled between the look above and the lock
        if not had_lock:
            (run_dir / LOCK).unlink(missing_ok=True)
        os.close(fd)
        raise _holds(run_dir, job)
    # a stale run.lock found here stays on undo; one this claim made goes with the rest
    return Claim(run_dir, fd, False, made, before if had_lock else before - {LOCK})


def _holds(run_dir: Path, job: str) -> RunDirError:
    other = recorded_job(run_dir)
    what = f"job {other!r}" if other else "files"
    hint = "" if other != job else " (the same job: pick a new job name or --run-dir)"
    return RunDirError(f"{run_dir}: already holds {what}{hint}; refusing to overwrite it")


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


# What --resume lets config.yaml change; everything else shapes the models, the data or the
# decisions, and a resumed job continues the one that ran.
RESUME_MAY_CHANGE = (
    "train.epochs",
    "faults.",
    "tracking.",
    "history.",
    "resources.placement",
    "resources.placement_timeout",
    "resources.device",
)


def claim_for_resume(run_dir: Path, cfg: Config) -> Claim:
    """Hold the claim of a run directory that `--resume` can continue: the same job as its
    history, not finished, not running, and its config.yaml changed only in keys of
    RESUME_MAY_CHANGE from the config its history records."""
    run_dir = open_run_dir(run_dir)
    fd = _lock(run_dir, cfg.job)
    try:
        meta = _history_meta(run_dir)
        ran = meta.get("job")
        if ran is not None and ran != cfg.job:
            raise RunDirError(f"{run_dir}: holds job {ran!r}, not {cfg.job!r}")
        if (run_dir / "summary.json").exists():
            raise RunDirError(f"{run_dir}: job {cfg.job!r} already finished (summary.json exists)")
        if meta.get("config"):
            _same_job(run_dir, meta["config"], cfg)
    except BaseException:
        os.close(fd)
        raise
    return Claim(run_dir, fd, True)


def _history_meta(run_dir: Path) -> dict[str, str]:
    from ensemble.history import HistoryReader

    h = HistoryReader(run_dir / "history.sqlite")
    try:
        return h.meta()
    finally:
        h.close()


def _same_job(run_dir: Path, recorded: str, cfg: Config) -> None:
    """Refuse a config.yaml edited, since the job started, in a key --resume keeps."""
    try:
        ran = Config.model_validate(migrate(load_yaml(recorded, "the history's config") or {}))
    except (yaml.YAMLError, ValidationError) as e:
        raise RunDirError(f"{run_dir}: the history's own config is damaged ({e})") from None
    old, new = _flat(ran.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    changed = [
        k
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k) and not k.startswith(RESUME_MAY_CHANGE)
    ]
    if changed:
        diffs = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise RunDirError(
            f"{run_dir / 'config.yaml'}: --resume continues the job that ran, but the config "
            f"changes {diffs}{more}; only {', '.join(k.rstrip('.') for k in RESUME_MAY_CHANGE)} "
            "may change"
        )


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "options":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def inside(run_dir: Path, stored: str | Path, what: str) -> Path:
    """A path inside `run_dir`, resolved; one that leads out of it (absolute, `..`, a
    symlink out) is refused, never opened nor deleted. `what` names who asked."""
    root = Path(run_dir).resolve()
    target = (root / stored).resolve()
    if not target.is_relative_to(root):
        raise RunDirError(f"{what}: refuses path {str(stored)!r}: it leads outside {root}")
    return target


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
