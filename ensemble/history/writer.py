"""The coordinator's single writer: one transaction per call, plus tether generations."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save as save_bytes
from safetensors.numpy import save_file

from ensemble.errors import EnsembleError
from ensemble.history.retention import dropped_by_retention, parse_retention
from ensemble.history.schema import SCHEMA, SCHEMA_VERSION, check_schema, connect, pack_upper

WEIGHTS_KEPT = 512  # a weighted target's weights are stored up to this many members
STATE_EVERY_ROUND = 16 * 2**20  # a policy state up to this size is saved with every round


class HistoryFullError(EnsembleError):
    """The history could not be written (disk full, or the file is read-only)."""


class HistoryWriter:
    def __init__(
        self,
        path: str | Path,
        job: str,
        config_yaml: str,
        retention: str = "all",
        lock_timeout: float = 60.0,
        compat_every: int = 1,
    ):
        self.path = Path(path)
        self.run_dir = self.path.parent
        self.retention = parse_retention(retention)
        self.compat_every = compat_every  # 0: no compat matrices kept (history.compat)
        self.lock = take_lock(self.path.with_suffix(".lock"), lock_timeout)
        self._in_tx = False
        try:
            self._open(job, config_yaml)
        except BaseException:
            os.close(self.lock)
            raise

    def _open(self, job: str, config_yaml: str) -> None:
        self.conn = connect(self.path)
        empty = self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        self.reopened = not empty  # an existing history: the caller restores its state
        if empty:  # new, or created empty by a reader that raced us
            with self.tx():
                self.conn.executescript(SCHEMA)
                self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self.conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [
                        ("job", job),
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("config", config_yaml),
                        ("created", str(time.time())),
                    ],
                )
        else:
            check_schema(self.conn, self.path, readable=(SCHEMA_VERSION,))

    @contextmanager
    def tx(self):
        """One transaction; nested uses join the outer one, so a caller can group many
        writes (a whole stack report, a round) into one commit. Out of space, it rolls back
        whole and becomes a clear error: the file keeps everything committed before, and
        stays a valid database."""
        if self._in_tx:
            yield
            return
        self._in_tx = True
        try:
            with self.conn:
                yield
        except sqlite3.OperationalError as e:
            if "full" in str(e) or "readonly" in str(e) or "I/O" in str(e):
                raise HistoryFullError(f"{self.path}: cannot write the history ({e})") from None
            raise
        finally:
            self._in_tx = False

    def publications(self, rows: list[tuple]) -> int:
        """rows: (model, step, epoch, loss, grad_norm, probe1, probe2, entropy, sparsity);
        probes are the seed's tracked weights, the activation entropy and the sparsity.
        A (model, step) already recorded is a replay (a worker restarted or resumed from a
        checkpoint and trained that step again): its row is replaced by the new one.
        Returns how many rows are new."""
        if not rows:
            return 0
        now = time.time()
        by_step: dict[int, list[int]] = {}  # a report's rows share one step
        for r in rows:
            by_step.setdefault(r[1], []).append(r[0])
        with self.tx():
            known = sum(
                self.conn.execute(
                    f"SELECT COUNT(*) FROM publications WHERE step = ? AND model IN"
                    f" ({','.join('?' * len(chunk))})",
                    (step, *chunk),
                ).fetchone()[0]
                for step, models in by_step.items()
                for chunk in (models[i : i + 500] for i in range(0, len(models), 500))
            )
            self.conn.executemany(
                "INSERT INTO publications (model, step, epoch, loss, grad_norm, t,"
                " probe1, probe2, entropy, sparsity) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (model, step) DO UPDATE SET epoch = excluded.epoch,"
                " loss = excluded.loss, grad_norm = excluded.grad_norm, t = excluded.t,"
                " probe1 = excluded.probe1, probe2 = excluded.probe2,"
                " entropy = excluded.entropy, sparsity = excluded.sparsity",
                [(*r[:5], now, *r[5:]) for r in rows],
            )
        return len(rows) - known

    def publication(self, model: int, step: int, epoch: int, loss: float, grad_norm: float):
        """One publication without probes (tests, tools)."""
        self.publications([(model, step, epoch, loss, grad_norm, None, None, None, None)])

    def round(
        self,
        models: list[int],
        compat: dict[str, tuple[list[int], np.ndarray]],
        records: list[tuple],
        policy: dict | None = None,
        groups: list[list[int]] | None = None,
        state: dict[str, np.ndarray] | None = None,
    ) -> int:
        """One decision round in one transaction: the compat matrices it saw (one row per
        layer: the ids and the matrix's upper triangle), the instructions it gave, the
        policy's settings (JSON), the groups it saw and the policy's state.

        records: (instruction, step, epoch, merges_in_epoch) per instruction (an
        ensemble.protocol.Instruction). A target group of several members is stored once a
        round (`member_sets`); a weighted mean's weights beside the instruction, up to
        WEIGHTS_KEPT members (beyond, they follow from the round's compat and the rule).
        """
        now = time.time()
        with self.tx():
            cur = self.conn.execute(
                "INSERT INTO rounds (t, models, instructions, policy, groups)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    now,
                    json.dumps(models),
                    len(records),
                    json.dumps(policy or {}, sort_keys=True),
                    None if groups is None else json.dumps(groups),
                ),
            )
            rid = cur.lastrowid
            every = self.compat_every
            if every and (rid % every == 0 or rid == 1):
                self.conn.executemany(
                    "INSERT INTO compat VALUES (?, ?, ?, ?)",
                    [(rid, layer, *pack_upper(ids, mat)) for layer, (ids, mat) in compat.items()],
                )
            sets, rows = instruction_rows(rid, records, now)
            self.conn.executemany(
                "INSERT INTO member_sets VALUES (?, ?, ?)",
                [(rid, k, np.asarray(g, np.int32).tobytes()) for g, k in sets.items()],
            )
            self.conn.executemany(
                "INSERT INTO instructions (round, kind, model, partner, member_set, weights,"
                " layer, rate, compat, rule, step, epoch, merges_in_epoch, t)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # a small state every round; a large one (gravity's M^2 cosines: 100 MB at
            # M = 4,096) with the rounds whose compat matrices are kept (history.compat)
            small = sum(np.asarray(v).nbytes for v in (state or {}).values()) <= STATE_EVERY_ROUND
            if state and (small or (every and (rid % every == 0 or rid == 1))):
                self.conn.execute(
                    "INSERT OR REPLACE INTO policy_state VALUES ('latest', ?, ?)",
                    (rid, save_bytes({k: np.ascontiguousarray(v) for k, v in state.items()})),
                )
        return rid

    def generation(
        self,
        model: int,
        generation: int,
        round_id: int | None,
        step: int,
        tethers: dict[str, np.ndarray],
    ) -> None:
        """Snapshot one model's tethers (see `generations`)."""
        self.generations([(model, generation, round_id, step, tethers)])

    def generations(self, rows: list[tuple[int, int, int | None, int, dict]]) -> None:
        """Snapshot several models' tethers into one safetensors file, then apply the
        retention rule.

        rows: (model, generation, round, step, layer -> tethers). A round's new generations
        share one file, `generations/round_<id>.safetensors`; others (a model's first
        tethers, a rejected merge) are named by their first row. Keys are
        `model_<i>/<layer>`, and models whose tethers are identical (a merged pair, a
        FedAvg population) share the first one's: a FedAvg round of 4,096 models is one
        model's worth of bytes, not 145 MB. One file per round, not per model and
        generation: at thousands of models that was a file system's worth of small files.
        """
        if not rows:
            return
        model0, gen0, round_id = rows[0][0], rows[0][1], rows[0][2]
        name = f"round_{round_id:06d}" if round_id is not None else f"model_{model0}_gen_{gen0:06d}"
        rel = str(Path("generations") / f"{name}.safetensors")
        target = self.run_dir / rel
        tmp = target.with_suffix(".tmp")
        tensors, keys = deduplicated(rows)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp))
            os.replace(tmp, target)  # atomic: a reader never sees half a file
        except (OSError, SafetensorError) as e:
            raise HistoryFullError(f"{target}: cannot write the history ({e})") from None
        self._retain(rows, rel, keys)

    def _retain(self, rows: list[tuple], rel: str, keys: list[str]) -> None:
        """Record the generations written to `rel`, drop what the retention rule lets go,
        and delete a file once no kept generation is in it."""
        now = time.time()
        drops = [
            (m, d)
            for m, g, *_ in rows
            if (d := dropped_by_retention(*self.retention, g)) is not None
        ]
        with self.tx():
            self.conn.executemany(
                "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (m, g, r, s, rel, now, key)
                    for (m, g, r, s, _), key in zip(rows, keys, strict=True)
                ],
            )
            old = {
                p
                for m, d in drops
                for (p,) in self.conn.execute(
                    "SELECT path FROM generations WHERE model = ? AND generation = ?"
                    " AND path IS NOT NULL",
                    (m, d),
                )
            }
            self.conn.executemany(
                "UPDATE generations SET path = NULL WHERE model = ? AND generation = ?", drops
            )
            # a file goes once no kept generation is in it
            gone = [
                p
                for p in old
                if not self.conn.execute(
                    "SELECT 1 FROM generations WHERE path = ? LIMIT 1", (p,)
                ).fetchone()
            ]
        own = (self.run_dir / "generations").resolve()
        for p in gone:  # only our own files: a stored path is data, and may lie
            f = self.run_dir / p
            if f.suffix == ".safetensors" and f.resolve().parent == own:
                f.unlink(missing_ok=True)

    def val_probs(self, epoch: int, probs: dict[int, np.ndarray]) -> set[int]:
        """Store members' validation probabilities for an epoch (model -> (N, C)), in one
        transaction; return which members have theirs stored for that epoch."""
        rows = [
            (m, epoch, json.dumps(p.shape), np.ascontiguousarray(p, dtype=np.float32).tobytes())
            for m, p in probs.items()
        ]
        with self.tx():
            self.conn.executemany("INSERT OR REPLACE INTO val_probs VALUES (?, ?, ?, ?)", rows)
        q = "SELECT model FROM val_probs WHERE epoch = ?"
        return {m for (m,) in self.conn.execute(q, (epoch,))}

    def load_val_probs(self, epoch: int) -> dict[int, np.ndarray]:
        """Every member's stored validation probabilities for an epoch, model -> (N, C)."""
        rows = self.conn.execute(
            "SELECT model, shape, probs FROM val_probs WHERE epoch = ?", (epoch,)
        )
        return {m: np.frombuffer(b, dtype=np.float32).reshape(json.loads(sh)) for m, sh, b in rows}

    def drop_val_probs(self, epoch: int) -> None:
        """An epoch's probabilities are needed only until the ensemble's score for it is
        recorded; at 4,096 models they are 44 MB an epoch."""
        with self.tx():
            self.conn.execute("DELETE FROM val_probs WHERE epoch = ?", (epoch,))

    def metrics(self, model: int, epoch: int, split: str, loss: float, accuracy: float):
        with self.tx():
            self.conn.execute(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                (model, epoch, split, loss, accuracy, time.time()),
            )

    def event(self, kind: str, model: int | None = None, step: int | None = None, **detail):
        """Record an event once: the same event again (a replay after a restart or resume,
        a retried call) is not recorded twice."""
        text = json.dumps(detail, sort_keys=True)
        with self.tx():
            seen = self.conn.execute(
                "SELECT 1 FROM events WHERE kind = ? AND model IS ? AND step IS ? AND detail = ?",
                (kind, model, step, text),
            ).fetchone()
            if not seen:
                self.conn.execute(
                    "INSERT INTO events (model, kind, step, detail, t) VALUES (?, ?, ?, ?, ?)",
                    (model, kind, step, text, time.time()),
                )

    def close(self):
        self.conn.close()
        os.close(self.lock)  # releases the lock


def _fingerprint(arrays: dict[str, np.ndarray]) -> tuple:
    """Layer names, shapes and three elements of each: equal for identical tethers, and
    almost never equal otherwise, so only likely twins are compared in full."""
    picks = lambda a: [float(a.flat[i]) for i in (0, a.size // 2, -1)] if a.size else []  # noqa: E731
    return tuple((k, a.shape, *picks(a)) for k, a in sorted(arrays.items()))


def take_lock(path: Path, timeout: float) -> int:
    """One writer per history: an exclusive flock, released when the holder exits (even
    killed). A second writer, e.g. a resumed job while the dead driver's coordinator is still
    shutting down, waits for it, then fails clearly."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.time() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.time() > deadline:
                os.close(fd)
                raise EnsembleError(
                    f"{path.parent}: another coordinator is writing this history;"
                    f" waited {timeout:g}s"
                ) from None
            time.sleep(0.2)


def instruction_rows(rid: int, records: list[tuple], now: float) -> tuple[dict, list[tuple]]:
    """A round's instructions as rows, and its distinct target groups (group -> its number
    in the round): each stored once however many instructions name it."""
    sets: dict[tuple[int, ...], int] = {}
    same: dict[int, int] = {}  # id of a group object -> its set (one hash per object)
    rows = []
    for ins, step, epoch, merges in records:
        partner, member_set = ins.partner, None
        if partner is None:
            member_set = same.get(id(ins.group))
            if member_set is None:
                member_set = same[id(ins.group)] = sets.setdefault(ins.group, len(sets))
        weights = None
        if ins.weights is not None and len(ins.weights) <= WEIGHTS_KEPT:
            weights = np.asarray(ins.weights, dtype=np.float32).tobytes()
        rows.append(
            (rid, ins.kind, ins.model, partner, member_set, weights, ins.layer, ins.rate)
            + (ins.compat, ins.rule, step, epoch, merges, now)
        )
    return sets, rows


def deduplicated(rows: list[tuple]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The tensors to store for rows of (model, generation, round, step, tethers), and
    each row's key: models whose tethers are identical share the first one's."""
    tensors, keys = {}, []
    stored: dict[tuple, list] = {}  # fingerprint -> [(key, arrays)] stored under it
    for m, _, _, _, tethers in rows:
        arrays = {k: np.ascontiguousarray(v) for k, v in tethers.items()}
        fp = _fingerprint(arrays)
        same = (
            key
            for key, other in stored.get(fp, [])
            if all(np.array_equal(arrays[k], other[k]) for k in arrays)
        )
        key = next(same, None)
        if key is None:  # new tethers: stored under this model's key
            key = f"model_{m}"
            tensors |= {f"{key}/{k}": v for k, v in arrays.items()}
            stored.setdefault(fp, []).append((key, arrays))
        keys.append(key)
    return tensors, keys
