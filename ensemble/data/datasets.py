"""Dataset registry: digits, breast_cancer and wine (bundled with sklearn, offline), the
seed's synthetic noise, and text files.

Every loader returns a `Dataset` of float32 features and int64 labels, split into
train/val/test by a seeded, stratified split where the labels allow it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ensemble.config import DataConfig
from ensemble.errors import DataError


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # (N, F) float32
    y_train: np.ndarray  # (N,) int64
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    mean: np.ndarray | None = None  # standardisation of raw inputs, from the train split
    std: np.ndarray | None = None
    class_names: list[str] | None = None  # a user's labels, when they were names
    image_shape: tuple[int, ...] | None = None  # one sample as an image (digits: 8x8)
    # data.member_column: each row's client (0..K-1) per split (train, val, test)
    clients: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    client_names: list[str] | None = None
    views: int = 1  # splits stacked once per group view (ensemble.data.groups.pooled)

    @property
    def features(self) -> int:
        return int(self.x_train.shape[1])

    def sizes(self) -> tuple[int, int, int]:
        """Rows of one view of each split (train, val, test)."""
        v = self.views
        return len(self.y_train) // v, len(self.y_val) // v, len(self.y_test) // v


def split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    cfg: DataConfig,
    seed: int,
    classes: int,
    standardise: bool,
    clients: np.ndarray | None = None,
) -> Dataset:
    """Seeded train/val/test split (stratified where the labels allow); clients (N,), a
    client id per row (data.member_column), are split along with the rows."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_test = int(np.ceil(n * cfg.test_fraction))
    n_val = int(np.ceil(n * cfg.val_fraction))
    if n - n_test - n_val < 1:
        raise DataError(f"{name}: {n} samples are too few to split into train/val/test")
    # Stratify when every split can hold every class; otherwise a plain seeded shuffle.
    strat = min(n_test, n_val) >= classes and np.bincount(y, minlength=classes).min() >= 3
    c = np.zeros(n, np.int64) if clients is None else np.asarray(clients, np.int64)
    x_rest, x_test, y_rest, y_test, c_rest, c_test = train_test_split(
        x, y, c, test_size=n_test, random_state=seed, stratify=y if strat else None
    )
    x_train, x_val, y_train, y_val, c_train, c_val = train_test_split(
        x_rest,
        y_rest,
        c_rest,
        test_size=n_val,
        random_state=seed,
        stratify=y_rest if strat else None,
    )
    mu = sd = None
    if standardise:  # statistics of the training split only
        mu, sd = x_train.mean(0), x_train.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        x_train, x_val, x_test = ((a - mu) / sd for a in (x_train, x_val, x_test))
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731
    return Dataset(
        name,
        f32(x_train),
        i64(y_train),
        f32(x_val),
        i64(y_val),
        f32(x_test),
        i64(y_test),
        classes,
        None if mu is None else f32(mu),
        None if sd is None else f32(sd),
        clients=None if clients is None else (i64(c_train), i64(c_val), i64(c_test)),
    )


def load_bundled(name: str, loader: str, cfg: DataConfig, seed: int) -> Dataset:
    """A small dataset bundled with scikit-learn (no download), standardised on train."""
    import sklearn.datasets

    d = getattr(sklearn.datasets, loader)()
    return split(
        name,
        d.data.astype(np.float64),
        d.target.astype(np.int64),
        cfg,
        seed,
        len(d.target_names),
        standardise=True,
    )


def load_digits(cfg: DataConfig, seed: int) -> Dataset:
    """sklearn's bundled 8x8 handwritten digits (1797 samples, 64 features, 10 classes)."""
    return replace(load_bundled("digits", "load_digits", cfg, seed), image_shape=(8, 8))


def load_breast_cancer(cfg: DataConfig, seed: int) -> Dataset:
    """sklearn's bundled Wisconsin breast cancer (569 samples, 30 features, 2 classes)."""
    return load_bundled("breast_cancer", "load_breast_cancer", cfg, seed)


def load_wine(cfg: DataConfig, seed: int) -> Dataset:
    """sklearn's bundled wine recognition (178 samples, 13 features, 3 classes)."""
    return load_bundled("wine", "load_wine", cfg, seed)


def load_iris(cfg: DataConfig, seed: int) -> Dataset:
    """sklearn's bundled iris (150 samples, 4 features, 3 classes)."""
    return load_bundled("iris", "load_iris", cfg, seed)


def load_classification(cfg: DataConfig, seed: int) -> Dataset:
    """A generated task (sklearn's make_classification, one fixed draw, so every job sees
    the same data): 1,500 samples, 20 features (10 informative), 4 classes of 2 clusters
    each. The studies hold it out: nothing was tuned on it."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=1500,
        n_features=20,
        n_informative=10,
        n_redundant=4,
        n_classes=4,
        n_clusters_per_class=2,
        class_sep=1.0,
        random_state=12345,
    )
    return split("classification", x, y.astype(np.int64), cfg, seed, 4, standardise=True)


def seed_noise(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed's default data: U[0,1) features and uniformly random labels."""
    rng = np.random.default_rng(seed)
    x = rng.random((cfg.samples, cfg.features), dtype=np.float32)
    y = rng.integers(0, cfg.classes, cfg.samples)
    return x, y


def load_synthetic(cfg: DataConfig, seed: int) -> Dataset:
    x, y = seed_noise(cfg, seed)
    return split("synthetic", x, y, cfg, seed, cfg.classes, standardise=False)


def read_numbers(path: Path, expected: int, what: str) -> np.ndarray:
    """Whitespace-separated floats from `path`, exactly `expected` of them, all finite."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not a text file; expected whitespace-separated numbers ({what})"
        ) from None
    tokens = text.split()
    if not tokens:
        raise DataError(f"{path}: {what} file is empty; expected {expected} numbers")
    try:
        values = np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError:
        bad = next(i for i, t in enumerate(tokens) if not _is_float(t))
        raise DataError(
            f"{path}: {what} value #{bad + 1} is {tokens[bad]!r}, not a number"
        ) from None
    if len(values) != expected:
        raise DataError(f"{path}: {what} file has {len(values)} numbers, expected {expected}")
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise DataError(f"{path}: {what} value #{bad + 1} is {tokens[bad]!r}; expected finite")
    return values


def _is_float(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def write_numbers(path: Path, values: np.ndarray) -> None:
    path.write_text(" ".join(map(str, np.asarray(values).reshape(-1).tolist())))


def load_text(cfg: DataConfig, seed: int) -> Dataset:
    """The seed's files: data (samples x features floats) and labels (samples ints)."""
    data_path, labels_path = Path(cfg.data_file), Path(cfg.labels_file)
    if cfg.create_missing and not (data_path.exists() and labels_path.exists()):
        x, y = seed_noise(cfg, seed)  # as the seed does when its files are absent
        if not data_path.exists():
            write_numbers(data_path, x)
        if not labels_path.exists():
            write_numbers(labels_path, y)
    x = read_numbers(data_path, cfg.samples * cfg.features, "data").reshape(
        cfg.samples, cfg.features
    )
    raw = read_numbers(labels_path, cfg.samples, "labels")
    if np.any(raw != np.round(raw)):
        bad = int(np.flatnonzero(raw != np.round(raw))[0])
        raise DataError(f"{labels_path}: label #{bad + 1} is {raw[bad]}, expected an integer")
    y = raw.astype(np.int64)
    out = (y < 0) | (y >= cfg.classes)
    if out.any():
        bad = int(np.flatnonzero(out)[0])
        raise DataError(
            f"{labels_path}: label #{bad + 1} is {y[bad]}, expected 0..{cfg.classes - 1}"
        )
    return split("text", x, y, cfg, seed, cfg.classes, standardise=False)


def load_user(cfg: DataConfig, seed: int) -> Dataset:
    """A user's csv, parquet, npy or factory data (ensemble.data.userdata)."""
    from ensemble.data import userdata

    read = {
        "csv": userdata.load_table,
        "parquet": userdata.load_table,
        "npy": userdata.load_arrays,
        "factory": userdata.load_from_factory,
    }[cfg.name]
    x, y, names, clients = read(cfg)
    codes, client_names = (None, None) if clients is None else clients
    d = split(cfg.name, x, y, cfg, seed, len(names), cfg.standardize, codes)
    d = replace(d, client_names=client_names)
    numbered = names == [str(i) for i in range(len(names))]
    return d if numbered else replace(d, class_names=names)


DATASETS: dict[str, Callable[[DataConfig, int], Dataset]] = {
    "digits": load_digits,
    "breast_cancer": load_breast_cancer,
    "wine": load_wine,
    "iris": load_iris,
    "classification": load_classification,
    "csv": load_user,
    "parquet": load_user,
    "npy": load_user,
    "factory": load_user,
    "synthetic": load_synthetic,
    "text": load_text,
}


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    if cfg.name not in DATASETS:
        raise DataError(
            f"data.name: unknown dataset {cfg.name!r}; choose one of {sorted(DATASETS)}"
        )
    return DATASETS[cfg.name](cfg, seed)


def load_peer_tethers(
    peers, shapes: dict[str, tuple[int, int]], seed: int
) -> dict[str, tuple[str, np.ndarray]]:
    """Fixed external tethers (config `peers`): name -> (layer, (out, in) float32 array)."""
    out = {}
    for k, peer in enumerate(peers):
        if peer.layer not in shapes:
            raise DataError(
                f"peers[{k}].layer: unknown layer {peer.layer!r}; the model has {list(shapes)}"
            )
        shape = shapes[peer.layer]
        path = Path(peer.file)
        if peer.create_missing and not path.exists():  # the seed's input_tether: U[0,1)
            write_numbers(path, np.random.default_rng(seed + k).random(shape, dtype=np.float32))
        n = shape[0] * shape[1]
        try:
            values = read_numbers(path, n, "tether")
        except DataError as e:
            raise DataError(f"{e} ({peer.layer} is {shape[0]}x{shape[1]})") from None
        out[peer.name] = (peer.layer, values.reshape(shape).astype(np.float32))
    return out
