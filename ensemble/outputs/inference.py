"""Using a trained ensemble: the members' files a finished job saves (save_members), loading
a run directory, predicting, evaluating.

ens = Ensemble.load("runs/<job>")
ens.predict_proba(x)        # (N, C), the mean of the members' probabilities; raw inputs
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ensemble.config import Config, load_config
from ensemble.data.datasets import Dataset, _is_float
from ensemble.data.groups import Shift, group_of, make_shift
from ensemble.data.userdata import read_npy
from ensemble.errors import DataError, RunDirError
from ensemble.outputs import evaluation
from ensemble.protocol import MemberResult
from ensemble.runtime import trust
from ensemble.runtime.rundir import inside
from ensemble.training.model import attach_tethers, build_member

OLD_KEY = re.compile(r"layers\.(\w+)\.(?:linear\.)?(weight|bias|tether)")


def migrate_member(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Member keys as an earlier version saved them (layers.fc1.linear.weight,
    layers.fc1.tether) in today's (fc1.weight, tether.fc1)."""
    out = {}
    for key, value in state.items():
        m = OLD_KEY.fullmatch(key)
        if m is None:
            out[key] = value
        elif m.group(2) == "tether":
            out[f"tether.{m.group(1)}"] = value
        else:
            out[f"{m.group(1)}.{m.group(2)}"] = value
    return out


def load_member(cfg: Config, features: int, classes: int, state: dict[str, np.ndarray]):
    """A saved member as a plain module of the job's architecture, its tethers attached as
    parametrizations (state: module keys plus `tether.<layer>`, as the run saves them)."""
    module, _ = build_member(cfg, features, classes, 0)
    state = migrate_member(state)
    tethers = {
        k.removeprefix("tether."): torch.from_numpy(np.array(v))
        for k, v in state.items()
        if k.startswith("tether.")
    }
    params = {
        k: torch.from_numpy(np.array(v)) for k, v in state.items() if not k.startswith("tether.")
    }
    try:
        module.load_state_dict(params)
        return attach_tethers(module, tethers).eval()
    except (RuntimeError, KeyError, ValueError) as e:  # saved by another architecture
        first = " ".join(str(e).split())[:300]
        raise RunDirError(
            f"a saved member does not fit the model its run's config.yaml describes ({first})"
        ) from None


class Ensemble:
    """A trained ensemble: its members by model id, the input standardisation, and how
    each member's group sees the data (data.groups, data.shift).

    `predict_proba(x)`: the mean of every member's probabilities on x as given (the global
    ensemble). `predict_proba(x, member=i)`: x as member i's group sees it (its shift
    applied after the standardisation, as in training), through the ensemble of i's group
    as the policy found it (the member alone when it shared with no one, or `alone`);
    `group=g`: the found group g's ensemble. Labels are each member's own: with
    `permute_labels`, group g's names for the classes."""

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        members: dict[int, torch.nn.Module],
        features: int,
        classes: int,
        mean: np.ndarray | None,
        std: np.ndarray | None,
    ):
        self.run_dir, self.cfg, self.members = run_dir, cfg, members
        self.ids = sorted(members)
        self.features, self.classes = features, classes
        self.mean, self.std = mean, std
        self.class_names: list[str] | None = None
        self.shift = Shift()
        self.found: list[list[int]] | None = None  # the groups the policy saw last
        self.trust_code = False  # evaluate: may data.factory's code run (ensemble.runtime.trust)

    @classmethod
    def load(cls, run_dir: str | Path, trust_code: bool = False) -> Ensemble:
        """The run's members. A run directory is data: code its config names (a model
        factory) is imported only if it is the code this machine trained the run with, or
        with trust_code=True (see ensemble.runtime.trust)."""
        run_dir = Path(run_dir)
        files, pre = saved_members(run_dir)
        cfg = load_config(run_dir / "config.yaml", saved=True)
        trust.check(cfg, run_dir, trust_code, ("model.factory",))
        with safe_open(str(pre), "np") as f:
            meta = f.metadata() or {}
        features, classes = int(meta["features"]), int(meta["classes"])
        stats = load_file(str(pre))
        members = {
            int(f.stem.split("_")[1]): load_member(cfg, features, classes, load_file(str(f)))
            for f in files
        }
        ens = cls(run_dir, cfg, members, features, classes, stats.get("mean"), stats.get("std"))
        ens.trust_code = trust_code
        if "class_names" in meta:  # the labels were names: class i is class_names[i]
            ens.class_names = json.loads(meta["class_names"])
        shape = json.loads(meta["image_shape"]) if meta.get("image_shape") else None
        ens.shift = make_shift(cfg.data, cfg.seed, features, classes, shape)
        summary = run_dir / "summary.json"
        if summary.is_file():
            ens.found = (json.loads(summary.read_text()).get("groups") or {}).get("found")
        return ens

    def group_of(self, model: int) -> int:
        """The data's group of a member (0 when the data define none)."""
        return group_of(model, self.cfg.data.groups, self.cfg.models.count)

    def _prepare(self, x: np.ndarray, source: str = "input") -> torch.Tensor:
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            kind = "complex" if np.issubdtype(x.dtype, np.complexfloating) else str(x.dtype)
            raise DataError(f"{source}: values are {kind}; expected real numbers")
        x = x.astype(np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise DataError(
                f"{source}: an array of shape {x.shape}; expected one row per input, "
                f"shape (N, {self.features})"
            )
        if x.shape[1] != self.features:
            raise DataError(
                f"{source}: rows have {x.shape[1]} values, the ensemble expects "
                f"{self.features} features per row"
            )
        if not np.isfinite(x).all():
            raise DataError(f"{source}: contains NaN or infinite values")
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def chosen(self, member: int | None = None, group: int | None = None, alone=False):
        """The member ids a prediction averages (see the class's docstring)."""
        if member is not None and group is not None:
            raise DataError("predict: give a member or a group, not both")
        if member is not None:
            if member not in self.members:
                raise DataError(f"--member {member}: no such member; the members are {self.ids}")
            if alone or not self.found:
                return [member]
            mine = next((g for g in self.found if member in g), [member])
            return [m for m in mine if m in self.members]
        if group is not None:
            if not self.found:
                raise DataError(
                    f"--group {group}: the run records no groups (its policy found none); "
                    "use --member"
                )
            if not 0 <= group < len(self.found):
                raise DataError(
                    f"--group {group}: the run found {len(self.found)} groups, "
                    f"0..{len(self.found) - 1}"
                )
            return [m for m in self.found[group] if m in self.members]
        return self.ids

    @torch.no_grad()
    def member_probas(
        self, x: np.ndarray, source: str = "input", ids=None, own_view: bool = False
    ) -> np.ndarray:
        """(M, N, C) class probabilities of the members `ids` (default all), from raw
        inputs; own_view: each through its own group's shift."""
        t = self._prepare(x, source)
        out = []
        for m in self.ids if ids is None else ids:
            xm = t
            if own_view and self.shift.views > 1:
                xm = torch.from_numpy(self.shift.x(t.numpy(), self.group_of(m)))
            out.append(torch.softmax(self.members[m](xm), 1).numpy())
        return np.stack(out)

    def predict_proba(
        self,
        x: np.ndarray,
        source: str = "input",
        member: int | None = None,
        group: int | None = None,
        alone: bool = False,
    ) -> np.ndarray:
        ids = self.chosen(member, group, alone)
        own = member is not None or group is not None
        return self.member_probas(x, source, ids, own_view=own).mean(0)

    def predict(self, x: np.ndarray, **which) -> np.ndarray:
        return self.predict_proba(x, **which).argmax(1)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Members and ensemble on the job's test split (rebuilt from its config and seed):
        global and personal scores (ensemble.outputs.evaluation.population), members by id."""
        from ensemble.data.datasets import load_dataset
        from ensemble.data.groups import pooled
        from ensemble.data.partitions import partition

        trust.check(self.cfg, self.run_dir, self.trust_code, ("data.factory",))
        data = pooled(load_dataset(self.cfg.data, self.cfg.seed), self.shift)  # standardised
        parts = partition(self.cfg.data, data, self.cfg.models.count, self.cfg.seed)
        t = torch.from_numpy(data.x_test)
        probs = {m: torch.softmax(self.members[m](t), 1).numpy() for m in self.ids}
        own = {m: parts.test[m] for m in self.ids}
        report = evaluation.population(probs, data.y_test, own, extra=True)
        return {"test_samples": int(len(data.y_test)), **report}


def saved_members(run_dir: Path) -> tuple[list[Path], Path]:
    """models/model_<i>.safetensors in order, and models/preprocess.safetensors: each a
    file of the run directory itself, never a symlink out of it."""
    models = Path(run_dir) / "models"
    files = sorted(models.glob("model_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    pre = models / "preprocess.safetensors"
    if not files or not pre.is_file():
        raise RunDirError(
            f"{run_dir}: no trained models (models/model_*.safetensors); did the job finish?"
        )
    for f in [*files, pre]:
        inside(run_dir, f.relative_to(run_dir), f"{run_dir}")
    return files, pre


def read_inputs(path: Path, label_column: str | None = None) -> np.ndarray:
    """x.npy (no pickles), x.csv (comma-separated) or x.txt (whitespace), one row per input.
    A CSV may start with a byte-order mark and a header row, as the training CSV does; a
    column named `label_column` there is the label, and is left out."""
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if path.suffix not in (".npy", ".csv", ".txt"):
        raise DataError(f"{path}: unknown input format {path.suffix!r}; use .npy, .csv or .txt")
    if path.suffix == ".npy":
        x = read_npy(path, "a numeric table")
    else:
        x = _read_text_table(path, "," if path.suffix == ".csv" else None, label_column)
    if x.size == 0:
        raise DataError(f"{path}: no inputs in the file")
    return x


def _read_text_table(path: Path, delimiter: str | None, label_column: str | None) -> np.ndarray:
    try:
        lines = [line for line in path.read_bytes().decode("utf-8-sig").splitlines() if line]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a numeric table (not UTF-8 text: {e.reason})") from None
    head = [c.strip().strip('"') for c in lines[0].split(delimiter)] if lines else []
    keep = None
    if head and not any(_is_float(c) for c in head):  # a header row: names, no values
        lines = lines[1:]
        keep = [i for i, c in enumerate(head) if c != label_column]
    if not lines:
        raise DataError(f"{path}: no inputs in the file")
    try:
        return np.loadtxt(io.StringIO("\n".join(lines)), delimiter=delimiter, ndmin=2, usecols=keep)
    except ValueError as e:
        raise DataError(f"{path}: not a numeric table ({str(e) or type(e).__name__})") from None


def save_members(run_dir: Path, results: list[MemberResult], data: Dataset) -> None:
    """models/model_<i>.safetensors per member (its module's keys, and tether.<layer>), and
    preprocess.safetensors: the input standardisation (empty when the data is used raw),
    so predictions take raw inputs."""
    out = run_dir / "models"
    tmp = run_dir / "models.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for r in results:
        save_file(r.weights, str(tmp / f"model_{r.model}.safetensors"))
    pre = {} if data.mean is None else {"mean": data.mean, "std": data.std}
    save_file(
        pre,
        str(tmp / "preprocess.safetensors"),
        metadata={
            "features": str(data.features),
            "classes": str(data.classes),
            **({"class_names": json.dumps(data.class_names)} if data.class_names else {}),
            **({"image_shape": json.dumps(list(data.image_shape))} if data.image_shape else {}),
        },
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
