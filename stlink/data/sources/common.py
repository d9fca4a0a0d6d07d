"""Parsing helpers shared by the source loaders (one module per source beside this one).

Loaders parse, they do not repair: duplicates, gaps, NaN and out-of-range values pass through
for validation to judge.  What cannot be parsed at all (an empty or corrupt file, a missing
column, an unreadable timestamp) raises ``DataError`` naming the file and column.

Data files are data: nothing here executes code found in a file (no unrestricted unpickling,
``allow_pickle=False`` for numpy, HDF read with h5py, never PyTables/pandas), see ``docs/data.md``.
"""
from __future__ import annotations

import csv
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlink.errors import DataError
from stlink.io import sha256_file

TIME_COLUMNS = ("timestamp", "time", "date", "datetime")
EDGE_VALUE_COLUMNS = {"cost": "distance", "distance": "distance", "weight": "weight"}  # column -> value_kind


# ---------------------------------------------------------------------------------------------
# shared parsing helpers


def require_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    return path


def read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv`` whose failures become ``DataError`` naming the file."""
    require_file(path)
    try:
        df = pd.read_csv(path, skipinitialspace=True, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def to_float(values: pd.Series, path: Path, column: str) -> np.ndarray:
    """Column -> float64; a non-numeric cell is an error naming file, column, row and value."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise DataError(f"{path}: column {column!r} holds booleans, not numbers")
    if pd.api.types.is_numeric_dtype(values.dtype):
        return values.to_numpy(np.float64)
    binary = values.map(lambda v: isinstance(v, (bytes, bytearray)))
    if binary.any():
        i = int(np.flatnonzero(binary.to_numpy())[0])
        raise DataError(f"{path}: column {column!r} row {i}: not a number: binary data "
                        f"({int(binary.sum())} such cells)")
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna() & values.notna() & (values.astype(str).str.strip() != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: column {column!r} row {i}: not a number: {values.iloc[i]!r} "
                        f"({int(bad.sum())} such cells)")
    return num.to_numpy(np.float64)


def to_timestamps(values: pd.Series | pd.Index, path: Path, column: str) -> np.ndarray:
    """Column -> datetime64[ns] (timezone-aware input is converted to naive UTC)."""
    values = pd.Series(values).reset_index(drop=True)
    if not pd.api.types.is_datetime64_any_dtype(values.dtype) and (
            pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)
            or pd.to_numeric(values, errors="coerce").notna().all()):
        raise DataError(f"{path}: column {column!r} holds numbers ({values.iloc[0]!r}, ...), not timestamps "
                        "(write them as text, e.g. 2024-01-01 00:05:00)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Could not infer format", UserWarning)
            ts = pd.to_datetime(values, errors="coerce")  # one format, inferred from the first value
            if (ts.isna() & values.notna()).any():  # formats vary: parse cell by cell (slow)
                ts = pd.to_datetime(values, errors="coerce", format="mixed")
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: column {column!r}: unreadable timestamps: {exc}") from None
    bad = ts.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: column {column!r} row {i}: unreadable timestamp {values.iloc[i]!r} "
                        f"({int(bad.sum())} such rows)")
    if ts.dt.tz is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    return ts.to_numpy("datetime64[ns]")


def timestamps_from(start_time: str | None, freq: str | None, periods: int, path: Path) -> np.ndarray:
    """A regular index for files without timestamps (PEMS npz, T-GCN csv)."""
    if not start_time or not freq:
        raise DataError(f"{path} has no timestamps: set data.start_time (the first timestamp) and "
                        f"data.freq (e.g. 5min); got start_time={start_time!r}, freq={freq!r}")
    try:
        start = pd.Timestamp(start_time)
        offset = pd.tseries.frequencies.to_offset(freq)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: data.start_time={start_time!r} / data.freq={freq!r}: {exc}") from None
    if pd.isna(start):
        raise DataError(f"{path}: data.start_time={start_time!r} is not a timestamp")
    return pd.date_range(start, periods=periods, freq=offset).to_numpy("datetime64[ns]")


def channel_names(channels: list[str], n: int) -> list[str]:
    """The first ``n`` configured names; ``ch<i>`` for channels beyond them."""
    return [channels[i] if i < len(channels) else f"ch{i}" for i in range(n)]


def units_for(units: list[str] | None, n: int) -> list[str]:
    units = list(units or [])
    return [units[i] if i < len(units) else "unknown" for i in range(n)]


def long_from_cube(values: np.ndarray, timestamps: np.ndarray, sensor_ids: list[str],
                    channels: list[str]) -> pd.DataFrame:
    """(T, N, C) cube -> long readings, time-major (all sensors of one timestamp together)."""
    t, n, c = values.shape
    frame = {
        "timestamp": np.repeat(timestamps.astype("datetime64[ns]"), n),   # (T*N,)
        "sensor_id": np.tile(np.asarray(sensor_ids, dtype=object), t),   # (T*N,)
    }
    flat = values.reshape(t * n, c)                                       # (T*N, C)
    for k, name in enumerate(channels):
        frame[name] = flat[:, k].astype(np.float64)
    return pd.DataFrame(frame)


def sensors_frame(sensor_ids: list[str], lat: np.ndarray | None = None,
                   lon: np.ndarray | None = None) -> pd.DataFrame:
    n = len(sensor_ids)
    return pd.DataFrame({
        "sensor_id": pd.Series(sensor_ids, dtype=object).astype(str),
        "lat": np.full(n, np.nan) if lat is None else np.asarray(lat, np.float64),
        "lon": np.full(n, np.nan) if lon is None else np.asarray(lon, np.float64),
    })


def source_meta(source: str, files: list[Path | None], null_value: float, channels: list[str],
          units: list[str] | None, freq: str | None, value_kind: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "source": source,
        "files": {p.name: sha256_file(p) for p in files if p is not None},
        "null_value": float(null_value),
        "channels": list(channels),
        "units": units_for(units, len(channels)),
        "freq": freq,
    }
    if value_kind is not None:
        meta["value_kind"] = value_kind
    return meta


def reason(exc: BaseException) -> str:
    """One line for a library exception (PyTables puts a whole HDF5 back trace in its message)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def duplicates(ids: list[str]) -> list[str]:
    s = pd.Series(ids)
    return s[s.duplicated()].unique().tolist()


# ---------------------------------------------------------------------------------------------
# graph files


def read_edges(path: Path) -> tuple[pd.DataFrame, str]:
    """Edge list CSV ``from,to,<cost|distance|weight>`` -> (from, to, value) and the value kind."""
    df = read_csv(path, dtype={"from": str, "to": str})
    require_columns(df, ["from", "to"], path)
    value_cols = [c for c in df.columns if c.lower() in EDGE_VALUE_COLUMNS]
    if not value_cols:
        raise DataError(f"{path}: missing column 'distance' (or 'cost' / 'weight'); found {list(df.columns)}")
    col = value_cols[0]
    for end in ("from", "to"):
        if df[end].isna().any():
            i = int(np.flatnonzero(df[end].isna().to_numpy())[0])
            raise DataError(f"{path}: column {end!r} row {i}: empty sensor id")
    edges = pd.DataFrame({
        "from": df["from"].astype(str).str.strip(),
        "to": df["to"].astype(str).str.strip(),
        "value": to_float(df[col], path, col),
    })
    return edges, EDGE_VALUE_COLUMNS[col.lower()]


def read_dense_matrix(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """Dense N x N CSV (no header, or a header row of sensor ids) -> (matrix, header ids or None).

    A header of numeric ids (METR-LA's ``773869, ...``) parses as numbers; it is recognised by the
    shape: N + 1 rows of N values."""
    require_file(path)
    with open(path, newline="") as fh:
        first = next(csv.reader(fh), [])
    header = None
    try:
        [float(x) for x in first]
    except ValueError:
        header = [x.strip() for x in first]
    df = read_csv(path, header=None, skiprows=1 if header else 0)
    mat = np.column_stack([to_float(df[c], path, str(c)) for c in df.columns]) if len(df) else \
        np.empty((0, 0))  # (N, N)
    if header is None and mat.ndim == 2 and mat.shape[0] == mat.shape[1] + 1:
        header, mat = [x.strip() for x in first], mat[1:]                   # numeric sensor ids
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise DataError(f"{path}: adjacency must be square, got {mat.shape[0]} x {mat.shape[1]}")
    if header is not None and len(header) != mat.shape[1]:
        raise DataError(f"{path}: header has {len(header)} ids for {mat.shape[1]} columns")
    return mat, header


def reorder(mat: np.ndarray, ids: list[str], order: list[str], path: Path) -> np.ndarray:
    """Permute square ``mat`` indexed by ``ids`` into ``order``; differing id sets are an error."""
    dup = duplicates(ids)
    if dup:
        raise DataError(f"{path}: duplicate sensor ids {dup[:10]}")
    only_graph = sorted(set(ids) - set(order))
    only_data = sorted(set(order) - set(ids))
    if only_graph or only_data:
        raise DataError(f"{path}: sensor ids differ from the readings: missing from the graph "
                        f"{only_data[:10]} ({len(only_data)}), not in the readings {only_graph[:10]} "
                        f"({len(only_graph)})")
    pos = {s: i for i, s in enumerate(ids)}
    idx = np.array([pos[s] for s in order], dtype=np.int64)
    return mat[np.ix_(idx, idx)]


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers (no arbitrary code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def read_sensors(path: Path, coords: bool = False) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """``sensor_id[, lat, lon]`` (or ``latitude, longitude``; other columns ignored), in file order.

    Coordinates are optional (many real networks have none): (ids, None, None) without them.
    ``coords=True`` requires them (a locations file).  One of lat/lon without the other is an error.
    """
    df = read_csv(path, dtype={"sensor_id": str})
    lat_col = "latitude" if "latitude" in df.columns and "lat" not in df.columns else "lat"
    lon_col = "longitude" if "longitude" in df.columns and "lon" not in df.columns else "lon"
    has = [c in df.columns for c in (lat_col, lon_col)]
    require_columns(df, ["sensor_id", lat_col, lon_col] if coords or any(has) else ["sensor_id"], path)
    if df["sensor_id"].isna().any():
        i = int(np.flatnonzero(df["sensor_id"].isna().to_numpy())[0])
        raise DataError(f"{path}: column 'sensor_id' row {i}: empty sensor id")
    ids = df["sensor_id"].astype(str).str.strip().tolist()
    if not any(has):
        return ids, None, None
    return ids, to_float(df[lat_col], path, lat_col), to_float(df[lon_col], path, lon_col)


def read_coords(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``sensor_id, lat, lon`` where the coordinates are required (a locations file)."""
    ids, lat, lon = read_sensors(path, coords=True)
    return ids, lat, lon  # type: ignore[return-value]


def raw_header(path: Path) -> list[str]:
    """The header cells exactly as written (pandas renames repeated names to ``x.1``)."""
    if path.suffix.lower() != ".csv":
        return []
    try:
        with open(path, newline="") as fh:
            return [c.strip() for c in next(csv.reader(fh), [])]
    except UnicodeDecodeError:
        return []



class PlainUnpickler(SafeUnpickler):
    """Builds only plain lists, tuples, dicts, strings and numbers: every global is refused."""

    ALLOWED: set[tuple[str, str]] = set()


def safe_unpickle(data: bytes, where: str, unpickler: type[SafeUnpickler] = PlainUnpickler) -> Any:
    """Unpickle ``data`` with a restricted unpickler; anything else is a ``DataError`` naming ``where``."""
    import io

    try:
        return unpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: refused or unreadable pickled value: {reason(exc)}") from None
