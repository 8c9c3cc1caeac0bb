"""The history's tethers: publications, tether generations (the safetensors files
beside it) and the compatibility matrices each round kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from ensemble.errors import RunDirError
from ensemble.history.records import (
    Generation,
    Publication,
)
from ensemble.history.schema import eq as _eq
from ensemble.history.schema import unpack_upper


class TetherQueries:
    """HistoryReader's queries over publications, tether files and compat matrices."""

    def publications(
        self, model: int | None = None, since_step: int | None = None, limit: int | None = None
    ) -> list[Publication]:
        head = (
            "SELECT id, model, step, epoch, loss, grad_norm, t, probe1, probe2, entropy,"
            " sparsity FROM publications"
        )
        conds = [_eq("model = ?", model), _eq("step >= ?", since_step)]
        return [Publication(*r) for r in self._rows(head, conds, "id", limit)]

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

    def compat_rounds(self, layer: str) -> list[int]:
        """The rounds whose compat matrices on `layer` were kept (history.compat)."""
        return [
            r
            for (r,) in self.conn.execute(
                "SELECT DISTINCT round FROM compat WHERE layer = ? ORDER BY round", (layer,)
            )
        ]
