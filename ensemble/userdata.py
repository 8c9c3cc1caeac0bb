"""Your own data: CSV and Parquet tables (through pyarrow), NumPy arrays, or a function.

- `data.name: csv | parquet` with `data.path`: one row per sample; `data.label_column`
  holds the class (integers, or names: sorted names become 0, 1, ...), every other column
  is a numeric feature.
- `data.name: npy` with `data.x_path` (samples × features, or samples × anything, which is
  flattened: a module of yours reshapes it back) and `data.y_path` (one label per sample).
- `data.name: factory` with `data.factory: "package.module:function"` (or a .py path): the
  function, called with `data.options` as keyword arguments, returns `(x, y)` arrays or a
  `torch.utils.data.Dataset` of `(x, y)` pairs.

Each is checked before anything trains: an error names the file, the row or column and
what was expected. Features are standardised with the training split's statistics unless
`data.standardize: false`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ensemble.config import DataConfig
from ensemble.errors import DataError


def load_table(cfg: DataConfig):
    """x (N, F) float64, y (N,) int64, the class names, and (data.member_column) each
    row's client id with the clients' names (else None), from a CSV or Parquet file."""
    path = _existing(cfg.path, "data.path", f"a .{cfg.name} file")
    table = _read_csv(path) if cfg.name == "csv" else _read_parquet(path)
    names = table.column_names
    if cfg.label_column not in names:
        raise DataError(
            f"{path}: no label column {cfg.label_column!r} (data.label_column); the columns "
            f"are {names[:20]}"
        )
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    client = cfg.member_column
    if client is not None and client not in names:
        raise DataError(
            f"{path}: no member column {client!r} (data.member_column); the columns are "
            f"{names[:20]}"
        )
    features = [n for n in names if n not in (cfg.label_column, client)]
    if not features:
        raise DataError(f"{path}: only the label column {cfg.label_column!r}; no features")
    x = np.stack([_numeric(path, table.column(n), n) for n in features], axis=1)
    y, classes = _labels(path, table.column(cfg.label_column).to_pylist(), cfg.label_column)
    clients = None if client is None else _clients(path, table.column(client).to_pylist(), client)
    return x, y, classes, clients


def _clients(path: Path, values: list, column: str) -> tuple[np.ndarray, list[str]]:
    """Each row's client id (0..K-1) and the clients' names, in sorted order (numbers
    numerically)."""
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            raise DataError(f"{path}: row {i + 1}, {column} is empty; expected a client name")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    distinct = sorted(set(values), key=(lambda v: float(v)) if numeric else str)
    index = {v: k for k, v in enumerate(distinct)}
    return np.asarray([index[v] for v in values], np.int64), [str(v) for v in distinct]


def load_arrays(cfg: DataConfig):
    """x and y from two .npy files, the class names, and no clients."""
    xp = _existing(cfg.x_path, "data.x_path", "a .npy file of samples")
    yp = _existing(cfg.y_path, "data.y_path", "a .npy file of labels")
    x, y = _npy(xp), _npy(yp)
    return (*_checked_arrays(x, y, str(xp), str(yp)), None)


def load_from_factory(cfg: DataConfig):
    """x and y from the user's function (arrays or a torch Dataset), the class names, and
    no clients."""
    from ensemble.model import load_factory

    what = f"data.factory {cfg.factory!r}"
    if cfg.factory is None:
        raise DataError("data.name factory: set data.factory to 'package.module:function'")
    fn = load_factory(cfg.factory, key="data.factory")
    try:
        got = fn(**cfg.options)
    except Exception as e:
        raise DataError(f"{what}: calling it failed: {type(e).__name__}: {e}") from None
    if isinstance(got, tuple) and len(got) == 2:
        x, y = got
    else:
        try:  # a torch.utils.data.Dataset (or any sequence) of (x, y) pairs
            pairs = [got[i] for i in range(len(got))]
            x = np.stack([np.asarray(p[0], dtype=np.float64) for p in pairs])
            y = np.asarray([np.asarray(p[1]).item() for p in pairs])
        except Exception as e:
            raise DataError(
                f"{what}: returned {type(got).__name__}; expected (x, y) arrays or a "
                f"Dataset of (x, y) pairs ({type(e).__name__}: {e})"
            ) from None
    return (*_checked_arrays(np.asarray(x), np.asarray(y), what, what), None)


# ---------------------------------------------------------------- the checks


def _existing(path: str | None, key: str, expected: str) -> Path:
    if path is None:
        raise DataError(f"{key}: not set; expected {expected}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p} ({key}): file not found; expected {expected}")
    return p


def _read_csv(path: Path):
    import pyarrow as pa
    from pyarrow import csv

    try:
        return csv.read_csv(path)
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0]
        line = _line_of(path, msg)
        where = f" (line {line})" if line else ""
        raise DataError(f"{path}{where}: not a valid CSV table: {msg}") from None


def _line_of(path: Path, msg: str) -> int | None:
    """The line a pyarrow parse error quotes ("...: <row text>"), if it can be found."""
    row = msg.rpartition(": ")[2].strip()
    if not row:
        return None
    try:
        with path.open("rb") as f:
            for i, raw in enumerate(f, 1):
                if raw.decode("utf-8", "replace").strip() == row:
                    return i
    except OSError:
        return None
    return None


def _read_parquet(path: Path):
    import pyarrow as pa
    from pyarrow import parquet

    try:
        return parquet.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a valid Parquet file: {str(e).splitlines()[0]}") from None


def _numeric(path: Path, column, name: str) -> np.ndarray:
    """A feature column as float64; the error names its first bad row (1 = first data row)."""
    import pyarrow as pa

    t = column.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise DataError(
                f"{path}: row {bad[0] + 1}, column {name!r} is empty, NaN or infinite; "
                "expected a number"
            )
        return values
    cells = column.to_pylist()
    for i, v in enumerate(cells):
        try:
            if v is None or not np.isfinite(float(v)):
                raise ValueError
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: row {i + 1}, column {name!r} is {v!r}; expected a number"
            ) from None
    return np.asarray(cells, dtype=np.float64)


def _labels(where, values: list, column: str = "label") -> tuple[np.ndarray, list[str]]:
    """Class ids 0..C-1 and names: integer labels keep their values (0..max), names and
    other values are numbered in sorted order."""
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            raise DataError(f"{where}: row {i + 1}, {column} is empty or NaN; expected a class")
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
    if not ints and all(isinstance(v, (float, np.floating)) for v in values):
        ints = all(float(v).is_integer() for v in values)
    if ints:
        y = np.asarray(values, dtype=np.float64).astype(np.int64)
        if y.min() < 0:
            i = int(np.flatnonzero(y < 0)[0])
            raise DataError(f"{where}: row {i + 1}, {column} is {y[i]}; expected 0 or more")
        names = [str(c) for c in range(int(y.max()) + 1)]
    else:
        names = sorted({str(v) for v in values})
        index = {n: i for i, n in enumerate(names)}
        y = np.asarray([index[str(v)] for v in values], dtype=np.int64)
    present = np.unique(y)
    if len(present) < 2:
        raise DataError(
            f"{where}: every sample is class {names[int(present[0])]!r}; expected at least 2 "
            "classes"
        )
    return y, names


def _npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a NumPy .npy array ({str(e).splitlines()[0]})") from None


def _checked_arrays(x: np.ndarray, y: np.ndarray, xw: str, yw: str):
    if x.ndim < 2 or len(x) == 0:
        raise DataError(f"{xw}: shape {x.shape}; expected (samples, features)")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{xw}: dtype {x.dtype}; expected numbers")
    x = x.reshape(len(x), -1).astype(np.float64)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{yw}: shape {y.shape}; expected ({len(x)},), one label per sample")
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        r, c = bad[0]
        raise DataError(f"{xw}: sample {r + 1}, feature {c + 1} is {x[r, c]}; expected finite")
    y, names = _labels(yw, y.tolist())
    return x, y, names
