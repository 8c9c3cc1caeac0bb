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

import math
import os
from pathlib import Path

import numpy as np

from ensemble.config import MAX_CLASSES, DataConfig
from ensemble.errors import DataError

F32_MAX = float(np.finfo(np.float32).max)  # features train as float32: past this is inf


def load_table(cfg: DataConfig):
    """x (N, F) float64, y (N,) int64, the class names, and (data.member_column) each
    row's client id with the clients' names (else None), from a CSV or Parquet file."""
    path = _existing(cfg.path, "data.path", f"a .{cfg.name} file")
    table = _read_csv(path) if cfg.name == "csv" else _read_parquet(path)
    names = table.column_names
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{path}: column {twice[0]!r} appears more than once; names must differ")
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
    from ensemble.training.model import load_factory

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
        bad = np.flatnonzero(~(np.abs(values) <= F32_MAX))  # NaN too
        if len(bad):
            raise DataError(
                f"{path}: row {bad[0] + 1}, column {name!r} is empty, NaN or infinite, or past "
                f"float32's range ({values[bad[0]]}); expected a number within ±{F32_MAX:.3g}"
            )
        return values
    cells = column.to_pylist()
    for i, v in enumerate(cells):
        try:
            if v is None or not abs(float(v)) <= F32_MAX:
                raise ValueError
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: row {i + 1}, column {name!r} is {v!r}; expected a number within "
                f"±{F32_MAX:.3g} (float32's range)"
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
        i = next((i for i, v in enumerate(values) if not float(v).is_integer()), None)
        if i is not None:  # a measurement, not a class: 120 values are not 120 classes
            raise DataError(
                f"{where}: row {i + 1}, {column} is {values[i]!r}, not a whole number; expected "
                "a class (an integer id or a name)"
            )
        ints = True
    if ints:
        y = np.asarray(values, dtype=np.float64)
        if y.min() < 0:
            i = int(np.flatnonzero(y < 0)[0])
            raise DataError(f"{where}: row {i + 1}, {column} is {values[i]}; expected 0 or more")
        if y.max() >= MAX_CLASSES:  # a class id, not a value: C logits are allocated
            i = int(np.argmax(y))
            raise DataError(
                f"{where}: row {i + 1}, {column} is {values[i]}; class ids run from 0 to at "
                f"most {MAX_CLASSES - 1:,}"
            )
        y = y.astype(np.int64)
        names = [str(c) for c in range(int(y.max()) + 1)]
    else:
        names = sorted({str(v) for v in values})
        if len(names) > MAX_CLASSES:
            raise DataError(
                f"{where}: {column} has {len(names):,} different values; expected at most "
                f"{MAX_CLASSES:,} classes"
            )
        index = {n: i for i, n in enumerate(names)}
        y = np.asarray([index[str(v)] for v in values], dtype=np.int64)
    present = np.unique(y)
    if len(present) < 2:
        raise DataError(
            f"{where}: every sample is class {names[int(present[0])]!r}; expected at least 2 "
            "classes"
        )
    return y, names


def read_npy(path: Path, what: str = "a NumPy .npy array") -> np.ndarray:
    """A .npy file's array, never a pickle. Its header is read first: a header claiming
    more bytes than the file holds (a huge shape, ten bytes of data) is refused, not
    allocated."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            have = os.fstat(f.fileno()).st_size - f.tell()
        need = math.prod(shape) * dtype.itemsize
        if not dtype.hasobject and need > have:
            raise DataError(
                f"{path}: its header claims an array of shape {shape} ({dtype}, {need:,} "
                f"bytes), but the file holds {have:,} bytes of data"
            )
        return np.load(path, allow_pickle=False)
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not {what} ({str(e).splitlines()[0]})") from None


def _npy(path: Path) -> np.ndarray:
    return read_npy(path)


def _checked_arrays(x: np.ndarray, y: np.ndarray, xw: str, yw: str):
    if x.ndim < 2 or len(x) == 0 or x.size == 0:
        raise DataError(f"{xw}: shape {x.shape}; expected (samples, features), both above 0")
    real = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    if not (real or x.dtype == bool):  # complex too: its imaginary part would be dropped
        raise DataError(f"{xw}: dtype {x.dtype}; expected real numbers")
    x = x.reshape(len(x), -1).astype(np.float64)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{yw}: shape {y.shape}; expected ({len(x)},), one label per sample")
    if np.issubdtype(y.dtype, np.complexfloating):
        raise DataError(f"{yw}: dtype {y.dtype}; expected class ids or names")
    bad = np.argwhere(~(np.abs(x) <= F32_MAX))
    if len(bad):
        r, c = bad[0]
        raise DataError(
            f"{xw}: sample {r + 1}, feature {c + 1} is {x[r, c]}; expected a finite number "
            f"within ±{F32_MAX:.3g} (float32's range)"
        )
    y, names = _labels(yw, y.tolist())
    return x, y, names
