"""Read-only queries over a history file: filters, explanations, lineage, generations."""

from __future__ import annotations

import functools
import heapq
import json
import math
import re
import sqlite3
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load as load_bytes

from ensemble.errors import RunDirError
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
from ensemble.history.schema import check_schema, unpack_upper

KINDS = ("merge", "drift")
V3_COLUMNS = (
    "id, round, kind, model, partner, member_set, weights, layer, rate, compat, rule, step,"
    " epoch, merges_in_epoch"
)
V2_COLUMNS = (
    "id, round, kind, model, partner, layer, rate, compat, rule, merge_above,"
    " drift_below, step, epoch, merges_in_epoch"
)


class HistoryReader:
    """Queries over one history.sqlite; every method returns plain typed records."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.run_dir = self.path.parent
        if not self.path.is_file():
            raise RunDirError(f"{self.path}: history file not found")
        # A finished history (no -wal beside it: no writer) is read as immutable, so that
        # reading it leaves no -wal or -shm file behind; a live one through its WAL.
        live = self.path.with_name(self.path.name + "-wal").exists()
        uri = f"file:{self.path.resolve()}?mode=ro" + ("" if live else "&immutable=1")
        try:
            self.conn = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
        except sqlite3.OperationalError as e:
            raise RunDirError(f"{self.path}: cannot open history ({e})") from None
        self.version = check_schema(self.conn, self.path)

    def _rows(self, head: str, conds: list, order: str, limit: int | None = None):
        """`head WHERE conds ORDER BY order [LIMIT limit]`; conds are (sql, args) pairs,
        None for a filter not given."""
        conds = [c for c in conds if c is not None]
        sql = f"{head} WHERE {' AND '.join(c for c, _ in conds) or '1'} ORDER BY {order}"
        args = [a for _, values in conds for a in values]
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        return self.conn.execute(sql, args)

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def model_count(self) -> int | None:
        """How many models the job trains (models.count of its config), if recorded."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        match = re.search(r"^models:\s*\n\s+count:\s*(\d+)", row[0] if row else "", re.M)
        return int(match.group(1)) if match else None

    def decisions(
        self,
        kind: str | None = None,
        model: int | None = None,
        layer: str | None = None,
        since_step: int | None = None,
        limit: int | None = None,
        pairs: bool = True,
        ids: list[int] | None = None,
    ) -> list[Decision]:
        """Merges and drifts in decision order.

        pairs=True gives one record per pair (the lower model id's side) and every
        instruction toward a group; `model` then matches either side of a pair, or the
        receiver. pairs=False gives every delivered instruction. ids: only these.
        """
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {list(KINDS)}")
        v3 = self.version >= 3
        group_target = "partner IS NULL" if v3 else "partner < 0"
        either = (
            ("(model = ? OR partner = ?)", (model, model)) if pairs else ("model = ?", (model,))
        )
        conds = [
            (f"(model < partner OR {group_target})", ()) if pairs else None,
            _eq("kind = ?", kind),
            either if model is not None else None,
            _eq("layer = ?", layer),
            _eq("step >= ?", since_step),
            None if ids is None else (f"id IN ({','.join('?' * len(ids))})", tuple(ids)),
        ]
        head = f"SELECT {V3_COLUMNS if v3 else V2_COLUMNS} FROM instructions"
        rows = self._rows(head, conds, "id", limit).fetchall()
        return self._v3_decisions(rows) if v3 else self._v2_decisions(rows)

    def _v3_decisions(self, rows) -> list[Decision]:
        rounds = sorted({r[1] for r in rows})
        sets, policy = self._member_sets(rounds), self._policies(rounds)
        out = []
        for i, rnd, kind, m, partner, mset, weights, layer, rate, c, rule, *rest in rows:
            group = (partner,) if partner is not None else sets[(rnd, mset)]
            w = None if weights is None else tuple(np.frombuffer(weights, np.float32).tolist())
            p = policy.get(rnd, {})
            bounds = (p.get("merge_above"), p.get("drift_below"))
            c = math.nan if c is None else c  # a policy that computes none (FedAvg)
            out.append(
                Decision(i, rnd, kind, m, partner, layer, rate, c, rule, *bounds, *rest, group, w)
            )
        return out

    def _v2_decisions(self, rows) -> list[Decision]:
        """Versions 1 and 2 named a group target partner -1: a merge toward the round's
        members' mean, or a drift away from all the others."""
        models = dict(self.rounds()) if any(r[4] < 0 for r in rows) else {}
        out = []
        for r in rows:
            partner, rnd, kind, m = r[4], r[1], r[2], r[3]
            if partner >= 0:
                group = (partner,)
            else:
                group = tuple(x for x in models.get(rnd, []) if kind == "merge" or x != m)
            partner = partner if partner >= 0 else None
            out.append(Decision(*r[:4], partner, *r[5:], group, None))
        return out

    def _member_sets(self, rounds: list[int]) -> dict[tuple[int, int], tuple[int, ...]]:
        """(round, set id) -> member ids, for the given rounds."""
        out = {}
        for chunk in (rounds[i : i + 500] for i in range(0, len(rounds), 500)):
            marks = ",".join("?" * len(chunk))
            q = f"SELECT round, id, members FROM member_sets WHERE round IN ({marks})"
            for rnd, k, blob in self.conn.execute(q, chunk):
                out[(rnd, k)] = tuple(np.frombuffer(blob, np.int32).tolist())
        return out

    def _policies(self, rounds: list[int]) -> dict[int, dict]:
        """round -> its policy settings (schema 3)."""
        out = {}
        for chunk in (rounds[i : i + 500] for i in range(0, len(rounds), 500)):
            q = f"SELECT id, policy FROM rounds WHERE id IN ({','.join('?' * len(chunk))})"
            out |= {rnd: json.loads(p) for rnd, p in self.conn.execute(q, chunk)}
        return out

    def round_groups(self) -> list[tuple[int, list[list[int]] | None]]:
        """(round id, the groups the policy saw in it), in order (schema 3; None before)."""
        if self.version < 3:
            return [(r, None) for r, _ in self.rounds()]
        return [
            (r, None if g is None else json.loads(g))
            for r, g in self.conn.execute("SELECT id, groups FROM rounds ORDER BY id")
        ]

    def policy_state(self) -> dict[str, np.ndarray]:
        """The policy's state as the last round saved it (schema 3; empty before)."""
        if self.version < 3:
            return {}
        row = self.conn.execute("SELECT state FROM policy_state WHERE key = 'latest'").fetchone()
        return {} if row is None else load_bytes(row[0])

    def merges(self, **filters) -> list[Decision]:
        return self.decisions(kind="merge", **filters)

    def drifts(self, **filters) -> list[Decision]:
        return self.decisions(kind="drift", **filters)

    def decisions_array(self, **filters) -> np.ndarray:
        """The same records as a numpy structured array, for analysis: `partner` is -1 for
        a target group of several members (`group_size` says how many; `decisions` names
        them)."""
        dtype = [
            ("id", "i8"),
            ("round", "i8"),
            ("kind", "U5"),
            ("model", "i8"),
            ("partner", "i8"),
            ("group_size", "i8"),
            ("layer", "U16"),
            ("compat", "f8"),
            ("step", "i8"),
            ("epoch", "i8"),
        ]
        rows = [
            (d.id, d.round, d.kind, d.model, -1 if d.partner is None else d.partner)
            + (len(d.group), d.layer, d.compat, d.step, d.epoch)
            for d in self.decisions(**filters)
        ]
        return np.array(rows, dtype=dtype)

    def publications(
        self, model: int | None = None, since_step: int | None = None, limit: int | None = None
    ) -> list[Publication]:
        head = (
            "SELECT id, model, step, epoch, loss, grad_norm, t, probe1, probe2, entropy,"
            " sparsity FROM publications"
        )
        conds = [_eq("model = ?", model), _eq("step >= ?", since_step)]
        return [Publication(*r) for r in self._rows(head, conds, "id", limit)]

    def events(self, kind: str | None = None, model: int | None = None) -> list[Event]:
        rows = self._rows(
            "SELECT id, model, kind, step, detail, t FROM events",
            [_eq("kind = ?", kind), _eq("model = ?", model)],
            "id",
        )
        return [Event(i, m, k, s, json.loads(d), t) for i, m, k, s, d, t in rows]

    def metrics(self, model: int | None = None) -> list[Metric]:
        rows = self._rows(
            "SELECT model, epoch, split, loss, accuracy FROM metrics",
            [_eq("model = ?", model)],
            "model, epoch, split",
        )
        return [Metric(*r) for r in rows]

    def count(self, table: str) -> int:
        assert table in {
            "publications",
            "rounds",
            "compat",
            "instructions",
            "metrics",
            "events",
            "generations",
        }
        return self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def explain(self, instruction_id: int) -> Explanation:
        found = self.decisions(ids=[instruction_id], pairs=False)
        if not found:
            raise RunDirError(f"{self.path}: no instruction with id {instruction_id}")
        d = found[0]
        (models_json,) = self.conn.execute(
            "SELECT models FROM rounds WHERE id = ?", (d.round,)
        ).fetchone()
        row_vals = self.compat_row(d.round, d.layer, d.model)
        before = d.merges_in_epoch - (1 if d.kind == "merge" else 0)
        rejected = None
        if d.kind == "merge":
            hit = self.rejection_of(d.model, d.layer, d.round)
            if hit is not None:
                rejected = {
                    "step": hit.step,
                    **{k: hit.detail[k] for k in ("val_loss_before", "val_loss_after")},
                }
        policy = self._policies([d.round]).get(d.round, {}) if self.version >= 3 else {}
        groups = dict(self.round_groups()).get(d.round)
        return Explanation(
            d,
            json.loads(models_json),
            dict(sorted(row_vals.items())),
            before,
            d.rule,
            rejected,
            policy,
            groups,
        )

    def rejection_of(self, model: int, layer: str, round_id: int) -> Event | None:
        """The merge guard's `rejected` event for this merge, if it undid it (a member
        takes at most one merge a layer a round)."""
        rows = self.conn.execute(
            "SELECT id, model, kind, step, detail, t FROM events WHERE kind = 'rejected'"
            " AND model = ? AND json_extract(detail, '$.layer') = ?"
            " AND json_extract(detail, '$.round') = ?",
            (model, layer, round_id),
        ).fetchall()
        return Event(*rows[0][:4], json.loads(rows[0][4]), rows[0][5]) if rows else None

    def undone(self) -> set[tuple[int, str, int]]:
        """(model, layer, round) of every merge the merge guard undid."""
        return {(r["model"], r["layer"], r["round"]) for r in self.rejected()}

    def rejected(self) -> list[dict]:
        """Merges the merge guard undid, each under its decision's id (the same ids as
        `decisions`, so `explain(id)` explains it), with the losses that undid it."""
        out = []
        for e in self.events("rejected"):
            d = e.detail
            row = self.conn.execute(
                "SELECT id FROM instructions WHERE kind = 'merge' AND round = ? AND model = ?"
                " AND layer = ?",
                (d.get("round"), e.model, d.get("layer")),
            ).fetchone()
            out.append({"id": row[0] if row else None, "model": e.model, "step": e.step, **d})
        return out

    def lineage(self, model: int) -> Lineage:
        """Every merge whose tethers flowed into `model`, recursively back in time: an edge
        from each member of a merge's target group. Merges the merge guard undid (a
        `rejected` event for the same model, round and layer) carried nothing and are left
        out."""
        undone = self.undone()
        into: dict[int, list[tuple]] = {}
        for d in self.decisions(kind="merge", pairs=False):
            if (d.model, d.layer, d.round) in undone:
                continue
            for j in d.group:
                if j != d.model:
                    row = (d.model, j, d.round, d.step, d.layer, d.rate, d.compat)
                    into.setdefault(d.model, []).append(row)
        return build_lineage(model, into)

    def generations(self, model: int) -> list[Generation]:
        return [
            Generation(*r)
            for r in self.conn.execute(
                "SELECT model, generation, round, step, path FROM generations WHERE model = ?"
                " ORDER BY generation",
                (model,),
            )
        ]

    def tethers(self, model: int, generation: int | None = None) -> dict[str, np.ndarray]:
        """One generation's tethers (the latest when None), layer -> array."""
        gens = self.generations(model)
        if not gens:
            raise RunDirError(f"{self.path}: no tether generations for model {model}")
        if generation is None:
            generation = gens[-1].generation
        match = [g for g in gens if g.generation == generation]
        if not match:
            raise RunDirError(
                f"model {model} has no generation {generation}; it has 0..{gens[-1].generation}"
            )
        if match[0].path is None:
            kept = [g.generation for g in gens if g.path is not None]
            raise RunDirError(
                f"generation {generation} of model {model} was not kept by the "
                f"retention setting; kept: {kept}"
            )
        path = str(self.inside(match[0].path))
        key = None
        if self.version >= 2:  # a round's file holds every model it changed, each by key
            (key,) = self.conn.execute(
                "SELECT key FROM generations WHERE model = ? AND generation = ?",
                (model, generation),
            ).fetchone()
        with safe_open(path, "numpy") as f:
            if key is None:  # schema 1: one model a file, keyed by layer
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            prefix = f"{key}/"
            return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118

    def inside(self, stored: str) -> Path:
        """A path the history stores, resolved inside its run directory; a path that leads
        out of it (absolute, `..`, a symlink out) is refused, never opened."""
        root = self.run_dir.resolve()
        target = (root / stored).resolve()
        if not target.is_relative_to(root):
            raise RunDirError(f"{self.path}: refuses stored path {stored!r}: outside {root}")
        return target

    def rounds(self) -> list[tuple[int, list[int]]]:
        """(round id, models in it), in order."""
        return [
            (r, json.loads(m))
            for r, m in self.conn.execute("SELECT id, models FROM rounds ORDER BY id")
        ]

    def compat_row(self, round_id: int, layer: str, model: int) -> dict[int, float]:
        """One model's compatibility with each other model a round saw on a layer."""
        if self.version == 1:
            rows = self.conn.execute(
                "SELECT i, j, value FROM compat WHERE round = ? AND layer = ? AND (i = ? OR j = ?)",
                (round_id, layer, model, model),
            )
            return {(j if i == model else i): v for i, j, v in rows}
        ids, mat = self.compat_matrix(round_id, layer)
        if model not in ids:
            return {}
        a = ids.index(model)
        # stored as float32: print each as the shortest decimal that is that float32
        return {m: float(str(np.float32(mat[a, b]))) for b, m in enumerate(ids) if b != a}

    def compat_matrix(self, round_id: int, layer: str) -> tuple[list[int], np.ndarray]:
        """The full compat matrix a round saw on a layer: (model ids, (k, k), NaN diagonal)."""
        if self.version >= 2:
            row = self.conn.execute(
                "SELECT models, upper FROM compat WHERE round = ? AND layer = ?", (round_id, layer)
            ).fetchone()
            return unpack_upper(*row) if row else ([], np.full((0, 0), np.nan))
        rows = self.conn.execute(
            "SELECT i, j, value FROM compat WHERE round = ? AND layer = ?", (round_id, layer)
        ).fetchall()
        ids = sorted({i for i, _, _ in rows} | {j for _, j, _ in rows})
        pos = {m: k for k, m in enumerate(ids)}
        mat = np.full((len(ids), len(ids)), np.nan)
        for i, j, v in rows:
            mat[pos[i], pos[j]] = mat[pos[j], pos[i]] = v
        return ids, mat

    def models(self) -> list[int]:
        """Every model that published at least once."""
        return [
            r
            for (r,) in self.conn.execute("SELECT DISTINCT model FROM publications ORDER BY model")
        ]

    def compat_rounds(self, layer: str) -> list[int]:
        """The rounds whose compat matrices on `layer` were kept (history.compat)."""
        return [
            r
            for (r,) in self.conn.execute(
                "SELECT DISTINCT round FROM compat WHERE layer = ? ORDER BY round", (layer,)
            )
        ]

    def layers(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT layer FROM compat ORDER BY layer")]

    def coordinator_state(self, count: int) -> CoordinatorState:
        """Everything a restarted coordinator (or a resumed job's) rebuilds itself from."""
        q = self.conn.execute
        st = CoordinatorState(restored=True)
        for m in range(count):
            gens = self.generations(m)
            if gens:
                st.generation[m] = gens[-1].generation
                st.tethers[m] = self.tethers(m)
        for m, step, epoch, loss in q(
            "SELECT model, step, epoch, loss FROM publications WHERE id IN"
            " (SELECT MAX(id) FROM publications GROUP BY model)"
        ):
            st.step[m], st.epoch[m], st.loss[m] = step, epoch, loss
        st.failed = {e.model for e in self.events(kind="failed")}
        st.finished = st.failed | {e.model for e in self.events(kind="finished")}
        for kind, model, epoch, n in q(
            "SELECT kind, model, epoch, COUNT(*) FROM instructions GROUP BY kind, model, epoch"
        ):
            st.per_epoch[(kind, model, epoch)] = n
        st.rounds = self.count("rounds")
        st.publications = self.count("publications")
        for kind, n in q("SELECT kind, COUNT(*) FROM instructions GROUP BY kind"):
            if kind in ("merge", "drift"):  # per instruction, as the coordinator counts
                setattr(st, f"{kind}s", n)
        st.rejected = q("SELECT COUNT(*) FROM events WHERE kind = 'rejected'").fetchone()[0]
        st.policy = self.policy_state()
        found = self.round_groups()
        st.groups = found[-1][1] if found else None
        return st

    def close(self):
        self.conn.close()


def _eq(sql: str, value) -> tuple[str, tuple] | None:
    """A one-placeholder filter, or None when the value is not given."""
    return None if value is None or value == "" else (sql, (value,))


def build_lineage(model: int, into: dict[int, list[tuple]]) -> Lineage:
    """Walk merges backwards: (m, before round r) pulls in the merges into m before r.

    into: receiver -> rows (model, partner, round, step, layer, rate, compat). Bounds are
    explored latest first (a heap), so each model is expanded once, at its latest bound.
    """
    explored: set[int] = set()
    edges: list[tuple] = []
    heap = [(-math.inf, model)]  # (-bound, model)
    while heap:
        neg, m = heapq.heappop(heap)
        if m in explored:
            continue  # already expanded at a later bound, which covered every earlier merge
        explored.add(m)
        for r in into.get(m, []):
            if r[2] < -neg:
                edges.append(r)
                heapq.heappush(heap, (-r[2], r[1]))
    edges.sort(key=lambda r: (r[2], r[0], r[4]))
    return Lineage(model, [LineageEdge(*r) for r in edges])


def _naming_the_file(method):
    """A query that reads a damaged database fails naming the file, not with SQLite's
    bare 'database disk image is malformed'."""

    @functools.wraps(method)
    def query(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise RunDirError(f"{self.path}: the history is damaged ({e})") from None

    return query


for _name, _method in list(vars(HistoryReader).items()):
    if callable(_method) and not _name.startswith("_") and _name != "close":
        setattr(HistoryReader, _name, _naming_the_file(_method))
