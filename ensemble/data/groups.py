"""Groups of members whose data differ: `data.groups` and `data.shift`.

Member i is in group `i * G // M`. Group g sees every split (train, validation, test, and
what `predict --member` is given) through one fixed, seeded transform; group 0 sees the
data as loaded:
- `rotate`: inputs are images (`data.image_shape`; digits' 8x8 is built in), turned by
  g * 90 degrees;
- `permute_labels`: the classes relabelled by a seeded permutation of group g;
- `permute_features`: the feature columns in a seeded order of group g;
- `none`: every group sees the same data (groups only name who belongs together).

`pooled(data, shift)` is the population's data: each split as every group sees it, one
block per group stacked (block g holds rows g*N .. (g+1)*N-1). A member indexes its own
group's block; the global test split is the whole stack: every row as each site has it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from ensemble.errors import DataError

SHIFTS = ("none", "rotate", "permute_labels", "permute_features")


def group_of(model: int, groups: int, count: int) -> int:
    """The group of member `model` among `count`: blocks of consecutive ids."""
    return model * groups // count


def true_groups(count: int, groups: int) -> list[list[int]] | None:
    """The members of each group, or None when the data define no groups (G = 1)."""
    if groups <= 1:
        return None
    out: list[list[int]] = [[] for _ in range(groups)]
    for m in range(count):
        out[group_of(m, groups, count)].append(m)
    return out


@dataclass(frozen=True)
class Shift:
    """How group g's data differ from group 0's; `x` and `y` apply it."""

    kind: str = "none"
    groups: int = 1
    features: int = 0
    classes: int = 0
    seed: int = 0
    image_shape: tuple[int, ...] | None = None  # (H, W) or (C, H, W), H == W for rotate

    @property
    def views(self) -> int:
        """How many different views of the data the groups have (1: all see the same)."""
        return 1 if self.kind == "none" else self.groups

    @functools.cached_property
    def _perms(self) -> list[np.ndarray]:
        n = self.classes if self.kind == "permute_labels" else self.features
        perms = [np.arange(n)]
        for g in range(1, self.groups):
            perms.append(np.random.default_rng([self.seed, 104_729, g]).permutation(n))
        return perms

    def label_map(self, g: int) -> np.ndarray:
        """(C,) group g's label of each class: y_g = label_map[y] (identity unless
        permute_labels)."""
        if self.kind != "permute_labels":
            return np.arange(self.classes)
        return self._perms[g]

    def x(self, x: np.ndarray, g: int) -> np.ndarray:
        """Inputs (N, F) as group g sees them."""
        if g == 0 or self.kind in ("none", "permute_labels"):
            return x
        if self.kind == "permute_features":
            return np.ascontiguousarray(x[:, self._perms[g]])
        img = x.reshape(len(x), *self.image_shape)
        return np.ascontiguousarray(np.rot90(img, k=g, axes=(-2, -1)).reshape(len(x), -1))

    def y(self, y: np.ndarray, g: int) -> np.ndarray:
        """Labels (N,) as group g names them."""
        return y if g == 0 else self.label_map(g)[y]

    def describe(self, g: int) -> dict:
        """What group g's transform is, for the summary and `predict`."""
        if self.kind == "rotate":
            return {"rotate_degrees": 90 * g}
        if self.kind == "permute_labels":
            return {"label_of_class": self.label_map(g).tolist()}
        if self.kind == "permute_features":
            return {"feature_order": self._perms[g].tolist()}
        return {}


def make_shift(cfg, seed: int, features: int, classes: int, image_shape=None) -> Shift:
    """The job's shift (cfg: its DataConfig), checked against the data: a rotation needs
    square images whose pixels are the features."""
    shape = tuple(cfg.image_shape) if cfg.image_shape else image_shape
    if cfg.shift == "rotate":
        if shape is None:
            raise DataError(
                f"data.shift rotate: the data ({cfg.name}) are not images; set "
                "data.image_shape to [H, W] or [C, H, W], the shape of one sample"
            )
        if int(np.prod(shape)) != features or shape[-1] != shape[-2]:
            raise DataError(
                f"data.image_shape {list(shape)}: expected square images (H == W) of "
                f"{features} values, the width of one sample"
            )
    return Shift(cfg.shift, cfg.groups, features, classes, seed, shape)


def pooled(data, shift: Shift):
    """The data (an ensemble.data.Dataset) as the whole population sees it: each split
    stacked once per group view (see the module's docstring). One view: unchanged."""
    v = shift.views
    if v == 1:
        return data
    stack = lambda split, f: np.concatenate([f(split, g) for g in range(v)])  # noqa: E731
    return replace(
        data,
        x_train=stack(data.x_train, shift.x),
        y_train=stack(data.y_train, shift.y),
        x_val=stack(data.x_val, shift.x),
        y_val=stack(data.y_val, shift.y),
        x_test=stack(data.x_test, shift.x),
        y_test=stack(data.y_test, shift.y),
        views=v,
    )
