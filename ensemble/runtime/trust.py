"""Code a run directory names runs only by the user's choice.

A run directory is data, like the safetensors in it. But its config.yaml may name a
`model.factory` or a `data.factory`, and using the run (`eval`, `predict`, `export
--soup`, `--resume`) imports that code. So when a job starts it records what each factory's
code was, its file and sha256, in <run dir>/code.json and in this user's own record,
$TETHER_ENSEMBLE_HOME/trusted_code.json (default ~/.tether-ensemble). Opening a run later
runs its code only if that code is still the file the run trained with and this user
trained with that very file here; anything else (a run directory from elsewhere, a factory
edited since, a config.yaml pointed at another file) is refused with the reason, unless the
user passes `--trust-code` (`trust_code=True` in Python).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

from ensemble.config import Config
from ensemble.errors import RunDirError

CODE = "code.json"  # in the run directory: what its factories' code was at training time
KEYS = ("model.factory", "data.factory")
KEPT = 50  # versions remembered per file in the user's record


def named(cfg: Config, keys: tuple[str, ...] = KEYS) -> dict[str, str]:
    """The factories `cfg` names, key -> 'target:function'."""
    specs = {"model.factory": cfg.model.factory, "data.factory": cfg.data.factory}
    return {k: specs[k] for k in keys if specs[k] is not None}


def store() -> Path:
    from ensemble.runtime.cluster import home

    return home() / "trusted_code.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _file_of(spec: str) -> Path | None:
    """The file a factory's code is in; for 'package.module', the module already imported
    (recording happens after the job's checks imported it)."""
    target = spec.rpartition(":")[0]
    if target.endswith(".py"):
        return Path(target)
    found = getattr(sys.modules.get(target), "__file__", None)
    return Path(found).resolve() if found else None


def record(cfg: Config, run_dir: Path) -> None:
    """At a job's start: <run dir>/code.json, and the user's record of trained-with code."""
    entries = {}
    for key, spec in named(cfg).items():
        path = _file_of(spec)
        if path is not None and path.is_file():
            entries[key] = {"spec": spec, "path": str(path), "sha256": sha256(path)}
    if not entries:
        return
    (Path(run_dir) / CODE).write_text(json.dumps(entries, indent=1) + "\n")
    f = store()
    f.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(f.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two jobs starting at once both keep their entry
        known = _read(f)
        for e in entries.values():
            shas = [s for s in known.get(e["path"], []) if s != e["sha256"]]
            known[e["path"]] = [*shas, e["sha256"]][-KEPT:]
        tmp = f.with_name(f".{f.name}.tmp")
        tmp.write_text(json.dumps(known, indent=1) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, f)
    finally:
        os.close(fd)


def _read(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        got = json.loads(path.read_text())
        if isinstance(got, dict):
            return got
    return {}


def check(cfg: Config, run_dir: Path, trust_code: bool, keys: tuple[str, ...] = KEYS) -> None:
    """Before code that `cfg` (a run directory's config) names is imported: refuse it,
    saying why, unless it is the code the run trained with, trained with here, or the user
    passed --trust-code."""
    if trust_code:
        return
    recorded = _read(Path(run_dir) / CODE)
    known = _read(store())
    for key, spec in named(cfg, keys).items():
        why = _distrust(spec, recorded.get(key), known)
        if why:
            raise RunDirError(
                f"{run_dir}: its config names {key} {spec!r}, code that using the run would "
                f"import, and {why}. A run directory is data: run its code only if you trust "
                "where it came from, with --trust-code"
            )


def _distrust(spec: str, rec, known: dict) -> str | None:
    """Why the code `spec` names is not known-good, or None."""
    if not isinstance(rec, dict) or rec.get("spec") != spec or "path" not in rec:
        return f"the run directory has no record ({CODE}) of training with it"
    path = Path(str(rec["path"]))
    target = spec.rpartition(":")[0]
    if target.endswith(".py") and Path(target) != path:
        return f"{CODE} records another file ({path})"
    if rec.get("sha256") not in known.get(str(path), []):
        return f"no job of this user here trained with that version of {path}"
    if not path.is_file() or sha256(path) != rec["sha256"]:
        return f"{path} has changed since the run trained with it"
    return None
