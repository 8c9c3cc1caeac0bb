"""The history's decisions: filters over merges and drifts (versions 1-3), their
explanations, what the guard undid, each round's groups and the policy's state, lineage."""

from __future__ import annotations

import heapq
import json
import math

import numpy as np
from safetensors.numpy import load as load_bytes

from ensemble.errors import RunDirError
from ensemble.history.records import (
    Decision,
    Event,
    Explanation,
    Lineage,
    LineageEdge,
)
from ensemble.history.schema import eq as _eq

KINDS = ("merge", "drift")
V3_COLUMNS = (
    "id, round, kind, model, partner, member_set, weights, layer, rate, compat, rule, step,"
    " epoch, merges_in_epoch"
)
V2_COLUMNS = (
    "id, round, kind, model, partner, layer, rate, compat, rule, merge_above,"
    " drift_below, step, epoch, merges_in_epoch"
)


class DecisionQueries:
    """HistoryReader's queries over instructions, rounds and member sets."""

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
