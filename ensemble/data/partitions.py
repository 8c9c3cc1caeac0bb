"""Which rows each member sees: iid, shard, Dirichlet label skew, or a natural column
(each client's rows), then placed in its group's block of the pooled splits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ensemble.config import DataConfig
from ensemble.data.datasets import Dataset
from ensemble.errors import DataError


@dataclass(frozen=True)
class Partition:
    """Which rows each model sees: train[m] indexes x_train, val[m] x_val and test[m]
    x_test (its own test rows: what its personal score is taken on). With groups whose
    data differ, the rows are in the model's own group's block of the pooled splits."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    test: list[np.ndarray] = field(default_factory=list)
    n_val: int = 0  # rows of the (pooled) validation split
    clients: list[list[str]] | None = None  # data.member_column: each model's clients

    @property
    def whole(self) -> bool:
        """Every model on every validation row (iid, no group views)."""
        return all(len(v) == self.n_val for v in self.val) and self.n_val > 0


def partition(cfg: DataConfig, data: Dataset, count: int, seed: int) -> Partition:
    """Each model's rows, by data.partition (see DataConfig), then moved into its group's
    block of the pooled splits (ensemble.data.groups). Seeded: the same for every run of a
    seed, whatever the placement."""
    from ensemble.data.groups import group_of

    n_train, n_val, n_test = data.sizes()
    y_train, y_val, y_test = data.y_train[:n_train], data.y_val[:n_val], data.y_test[:n_test]
    rng = np.random.default_rng([seed, 7919])
    clients = None
    if cfg.partition == "iid":
        train, val, test = ([np.arange(n)] * count for n in (n_train, n_val, n_test))
    elif cfg.partition == "shard":
        train, val, test = (
            np.array_split(rng.permutation(n), count) for n in (n_train, n_val, n_test)
        )
    elif cfg.partition == "column":
        train, val, test, clients = by_client(data, count, cfg.member_column)
    else:
        train, val, test = dirichlet((y_train, y_val, y_test), data.classes, count, cfg.alpha, rng)
    empty = [m for m in range(count) if not len(train[m]) or not len(val[m])]
    if empty:
        why = {"dirichlet": " or a larger data.alpha", "column": " or more clients"}
        raise DataError(
            f"data.partition {cfg.partition}: {n_train} training and {n_val} validation "
            f"samples cannot give each of {count} models a share (models {empty[:5]} would "
            f"get none); use fewer models{why.get(cfg.partition, '')}"
        )
    if data.views > 1:  # each model reads its own group's view
        off = [group_of(m, cfg.groups, count) for m in range(count)]
        train, val, test = (
            [r + off[m] * n for m, r in enumerate(rows)]
            for rows, n in ((train, n_train), (val, n_val), (test, n_test))
        )
    sort = lambda rows: [np.sort(r) for r in rows]  # noqa: E731
    return Partition(sort(train), sort(val), sort(test), len(data.y_val), clients)


def by_client(data: Dataset, count: int, column: str):
    """data.member_column: clients dealt to members in order (client k to member k mod M),
    so a member may hold several; each member's rows are its clients' rows of each split."""
    names = data.client_names or []
    if len(names) < count:
        raise DataError(
            f"data.member_column {column!r}: {len(names)} distinct clients, fewer than the "
            f"{count} members (models.count); use at most {len(names)} models"
        )
    owner = np.arange(len(names)) % count  # client -> member
    rows = [
        [np.flatnonzero(owner[c] == m) for m in range(count)] for c in data.clients
    ]  # per split
    held = [[names[k] for k in range(len(names)) if owner[k] == m] for m in range(count)]
    return (*rows, held)


def dirichlet(ys, classes: int, count: int, alpha: float, rng, min_rows: int = 8, tries=200):
    """Label skew: each class's rows are split across the models in proportions drawn from
    Dirichlet(alpha); validation and test rows follow the same proportions (a member's own
    distribution). Drawn again until every model has `min_rows` training rows and a
    validation row (or give up: DataError). ys: the labels of (train, val, test)."""
    for _ in range(tries):
        props = rng.dirichlet(np.full(count, alpha), size=classes)  # (C, M)
        train, val, test = (_split_by(y, props, rng) for y in ys)
        if min(len(t) for t in train) >= min_rows and min(len(v) for v in val) >= 1:
            return train, val, test
    raise DataError(
        f"data.alpha {alpha}: no Dirichlet draw in {tries} gave each of {count} models "
        f"{min_rows} training rows and a validation row; use a larger data.alpha or fewer "
        "models"
    )


def _split_by(y: np.ndarray, props: np.ndarray, rng) -> list[np.ndarray]:
    """Split the rows of each class c across models in proportions props[c]."""
    parts: list[list[np.ndarray]] = [[] for _ in range(props.shape[1])]
    for c in range(props.shape[0]):
        rows = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(props[c])[:-1] * len(rows)).round().astype(int)
        for m, chunk in enumerate(np.split(rows, cuts)):
            parts[m].append(chunk)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
