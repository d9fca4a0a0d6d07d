"""Loaders of the supported source formats, each returning a ``RawData``.

  pems    ASTGCN/STSGCN ``PEMS0x.npz`` (key ``data``, [T, N, C] or [T, N]) + edge list ``from,to,cost``
  metrla  DCRNN ``metr-la.h5`` (pandas HDF, DatetimeIndex x sensor ids) + ``adj_mx.pkl``
          (+ ``graph_sensor_locations.csv``)
  tgcn    T-GCN wide ``*_speed.csv`` (header = sensor ids, no timestamps) + dense ``*_adj.csv``
  byo     bring your own: ``readings.csv|parquet`` (long or wide) + ``sensors.csv`` + ``edges.csv``

Loaders parse, they do not repair: duplicates, gaps, NaN and out-of-range values pass through
for validation to judge.  What cannot be parsed at all (an empty or corrupt file, a missing
column, an unreadable timestamp) raises ``DataError`` naming the file and column.
"""
from __future__ import annotations

import csv
import pickle
import urllib.parse
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlink.config import DataConfig
from stlink.data.download import check_digest, fetch
from stlink.data.formats import DataError, RawData
from stlink.io import sha256_file

TIME_COLUMNS = ("timestamp", "time", "date", "datetime")
EDGE_VALUE_COLUMNS = {"cost": "distance", "distance": "distance", "weight": "weight"}  # column -> value_kind


# ---------------------------------------------------------------------------------------------
# shared parsing helpers


def _require_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    return path


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv`` whose failures become ``DataError`` naming the file."""
    _require_file(path)
    try:
        df = pd.read_csv(path, skipinitialspace=True, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def _to_float(values: pd.Series, path: Path, column: str) -> np.ndarray:
    """Column -> float64; a non-numeric cell is an error naming file, column, row and value."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise DataError(f"{path}: column {column!r} holds booleans, not numbers")
    if pd.api.types.is_numeric_dtype(values.dtype):
        return values.to_numpy(np.float64)
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna() & values.notna() & (values.astype(str).str.strip() != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: column {column!r} row {i}: not a number: {values.iloc[i]!r} "
                        f"({int(bad.sum())} such cells)")
    return num.to_numpy(np.float64)


def _to_timestamps(values: pd.Series | pd.Index, path: Path, column: str) -> np.ndarray:
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


def _timestamps_from(start_time: str | None, freq: str | None, periods: int, path: Path) -> np.ndarray:
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


def _channel_names(channels: list[str], n: int) -> list[str]:
    """The first ``n`` configured names; ``ch<i>`` for channels beyond them."""
    return [channels[i] if i < len(channels) else f"ch{i}" for i in range(n)]


def _units(units: list[str] | None, n: int) -> list[str]:
    units = list(units or [])
    return [units[i] if i < len(units) else "unknown" for i in range(n)]


def _long_from_cube(values: np.ndarray, timestamps: np.ndarray, sensor_ids: list[str],
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


def _sensors_frame(sensor_ids: list[str], lat: np.ndarray | None = None,
                   lon: np.ndarray | None = None) -> pd.DataFrame:
    n = len(sensor_ids)
    return pd.DataFrame({
        "sensor_id": pd.Series(sensor_ids, dtype=object).astype(str),
        "lat": np.full(n, np.nan) if lat is None else np.asarray(lat, np.float64),
        "lon": np.full(n, np.nan) if lon is None else np.asarray(lon, np.float64),
    })


def _meta(source: str, files: list[Path | None], null_value: float, channels: list[str],
          units: list[str] | None, freq: str | None, value_kind: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "source": source,
        "files": {p.name: sha256_file(p) for p in files if p is not None},
        "null_value": float(null_value),
        "channels": list(channels),
        "units": _units(units, len(channels)),
        "freq": freq,
    }
    if value_kind is not None:
        meta["value_kind"] = value_kind
    return meta


def _reason(exc: BaseException) -> str:
    """One line for a library exception (PyTables puts a whole HDF5 back trace in its message)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def _duplicates(ids: list[str]) -> list[str]:
    s = pd.Series(ids)
    return s[s.duplicated()].unique().tolist()


# ---------------------------------------------------------------------------------------------
# graph files


def read_edges(path: Path) -> tuple[pd.DataFrame, str]:
    """Edge list CSV ``from,to,<cost|distance|weight>`` -> (from, to, value) and the value kind."""
    df = _read_csv(path, dtype={"from": str, "to": str})
    _require_columns(df, ["from", "to"], path)
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
        "value": _to_float(df[col], path, col),
    })
    return edges, EDGE_VALUE_COLUMNS[col.lower()]


def read_dense_matrix(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """Dense N x N CSV (no header, or a header row of sensor ids) -> (matrix, header ids or None)."""
    _require_file(path)
    with open(path, newline="") as fh:
        first = next(csv.reader(fh), [])
    header = None
    try:
        [float(x) for x in first]
    except ValueError:
        header = [x.strip() for x in first]
    df = _read_csv(path, header=None, skiprows=1 if header else 0)
    mat = np.column_stack([_to_float(df[c], path, str(c)) for c in df.columns]) if len(df) else \
        np.empty((0, 0))  # (N, N)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise DataError(f"{path}: adjacency must be square, got {mat.shape[0]} x {mat.shape[1]}")
    if header is not None and len(header) != mat.shape[1]:
        raise DataError(f"{path}: header has {len(header)} ids for {mat.shape[1]} columns")
    return mat, header


def _reorder(mat: np.ndarray, ids: list[str], order: list[str], path: Path) -> np.ndarray:
    """Permute square ``mat`` indexed by ``ids`` into ``order``; differing id sets are an error."""
    dup = _duplicates(ids)
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


class _GraphUnpickler(pickle.Unpickler):
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


def read_dcrnn_pickle(path: Path) -> tuple[list[str], np.ndarray]:
    """DCRNN ``adj_mx.pkl`` (sensor_ids, sensor_id_to_ind, adj_mx) -> (ids in matrix order, matrix)."""
    _require_file(path)
    try:
        with open(path, "rb") as fh:
            obj = _GraphUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable DCRNN pickle: {_reason(exc)}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise DataError(f"{path}: expected a (sensor_ids, sensor_id_to_ind, adj_mx) tuple, "
                        f"got {type(obj).__name__}")
    _, id_to_ind, adj = obj
    adj = np.asarray(adj)
    if not isinstance(id_to_ind, dict) or adj.ndim != 2 or adj.shape[0] != adj.shape[1] \
            or len(id_to_ind) != adj.shape[0] or not np.issubdtype(adj.dtype, np.number):
        raise DataError(f"{path}: expected {{id: index}} and a square numeric matrix of that size, got "
                        f"{len(id_to_ind) if isinstance(id_to_ind, dict) else '?'} ids and "
                        f"{adj.dtype} {adj.shape}")
    ids = [None] * adj.shape[0]
    for sid, i in id_to_ind.items():
        if not (isinstance(i, (int, np.integer)) and 0 <= i < len(ids)) or ids[i] is not None:
            raise DataError(f"{path}: sensor {sid!r}: bad or repeated index {i!r}")
        ids[i] = sid.decode("latin1") if isinstance(sid, bytes) else str(sid)
    return ids, adj.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# loaders


def load_pems(npz: Path, edges_csv: Path | None, start_time: str | None, freq: str | None,
              channels: list[str], null_value: float, sensor_ids: Path | list[str] | None = None,
              units: list[str] | None = None) -> RawData:
    """PEMS0x ``npz`` (key ``data``, [T, N, C] or [T, N]); timestamps from ``start_time`` + ``freq``.

    Sensors are ``0..N-1`` unless ``sensor_ids`` (a list, or a text file with one id per line)
    names them in node order (PEMS03 ships ``PEMS03.txt`` of station ids).
    """
    npz = _require_file(Path(npz))
    values = _read_npz(npz)
    if values.ndim == 2:
        values = values[:, :, None]                                # (T, N, 1)
    if values.ndim != 3 or not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{npz}: 'data' must be numeric [T, N, C] or [T, N], got {values.dtype} {values.shape}")
    t, n, c = values.shape
    if isinstance(sensor_ids, (str, Path)):
        ids_path = _require_file(Path(sensor_ids))
        ids = [s.strip() for s in ids_path.read_text().replace(",", "\n").splitlines() if s.strip()]
    else:
        ids_path = None
        ids = [str(s) for s in sensor_ids] if sensor_ids is not None else [str(i) for i in range(n)]
    if len(ids) != n:
        raise DataError(f"{ids_path or 'sensor_ids'}: {len(ids)} sensor ids for {n} sensors in {npz}")
    names = _channel_names(channels, c)
    timestamps = _timestamps_from(start_time, freq, t, npz)
    edges, kind = read_edges(Path(edges_csv)) if edges_csv is not None else (None, None)
    return RawData(
        readings=_long_from_cube(values, timestamps, ids, names),
        sensors=_sensors_frame(ids),
        edges=edges,
        meta=_meta("pems", [npz, edges_csv and Path(edges_csv), ids_path], null_value, names, units,
                   freq, kind),
    )


def _read_npz(path: Path) -> np.ndarray:
    """Array ``data`` of an npz (a plain .npy array is accepted too)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            keys = list(loaded.files)
            values = np.asarray(loaded["data"]) if "data" in keys else None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable npz: {_reason(exc)}") from None
    if values is None:
        raise DataError(f"{path}: no array 'data' (found {keys})")
    return values


def _read_hdf(path: Path) -> pd.DataFrame:
    """The first table of a pandas HDF file."""
    try:
        with pd.HDFStore(path, mode="r") as store:
            keys = store.keys()
            if not keys:
                raise DataError(f"{path}: no table in this HDF file")
            df = store[keys[0]]
    except (DataError, ImportError):
        raise
    except Exception as exc:  # PyTables raises many kinds (HDF5ExtError, NoSuchNodeError, ...)
        raise DataError(f"{path}: not a readable pandas HDF file: {_reason(exc)}") from None
    if isinstance(df, pd.Series):
        df = df.to_frame()
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{path}: expected a DataFrame, got {type(df).__name__}")
    return df


def load_metrla(h5: Path, adj_pkl: Path | None, locations_csv: Path | None, channels: list[str],
                null_value: float, units: list[str] | None = None) -> RawData:
    """DCRNN METR-LA / PEMS-BAY: ``h5`` (DatetimeIndex x sensor ids) + ``adj_mx.pkl`` + locations."""
    h5 = _require_file(Path(h5))
    df = _read_hdf(h5)
    ids = [str(c).strip() for c in df.columns]
    if not ids or len(df) == 0:
        raise DataError(f"{h5}: the table is empty ({len(df)} rows x {len(ids)} sensor columns)")
    timestamps = _to_timestamps(df.index, h5, "index")
    values = np.column_stack([_to_float(df.iloc[:, j], h5, ids[j]) for j in range(len(ids))])  # (T, N)
    names = _channel_names(channels, 1)
    adjacency = None
    if adj_pkl is not None:
        graph_ids, mat = read_dcrnn_pickle(Path(adj_pkl))
        adjacency = _reorder(mat, graph_ids, ids, Path(adj_pkl))
    lat = lon = None
    if locations_csv is not None:
        lat, lon = _read_locations(Path(locations_csv), ids)
    freq = df.index.freqstr if isinstance(df.index, pd.DatetimeIndex) and df.index.freq else None
    return RawData(
        readings=_long_from_cube(values[:, :, None], timestamps, ids, names),
        sensors=_sensors_frame(ids, lat, lon),
        adjacency=adjacency,
        meta=_meta("metrla", [h5, adj_pkl and Path(adj_pkl), locations_csv and Path(locations_csv)],
                   null_value, names, units, freq, "weight" if adjacency is not None else None),
    )


def read_coords(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``sensor_id, lat, lon`` (or ``latitude, longitude``; other columns ignored), in file order."""
    df = _read_csv(path, dtype={"sensor_id": str})
    lat_col = "latitude" if "latitude" in df.columns and "lat" not in df.columns else "lat"
    lon_col = "longitude" if "longitude" in df.columns and "lon" not in df.columns else "lon"
    _require_columns(df, ["sensor_id", lat_col, lon_col], path)
    if df["sensor_id"].isna().any():
        i = int(np.flatnonzero(df["sensor_id"].isna().to_numpy())[0])
        raise DataError(f"{path}: column 'sensor_id' row {i}: empty sensor id")
    ids = df["sensor_id"].astype(str).str.strip().tolist()
    return ids, _to_float(df[lat_col], path, lat_col), _to_float(df[lon_col], path, lon_col)


def _read_locations(path: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) in ``ids`` order from a locations CSV; NaN for sensors it does not list."""
    loc_ids, lat_all, lon_all = read_coords(path)
    dup = _duplicates(loc_ids)
    if dup:
        raise DataError(f"{path}: sensor ids listed twice: {dup[:10]}")
    pos = pd.Index(loc_ids).get_indexer(ids)                      # (N,) -1 where unknown
    lat = np.where(pos >= 0, lat_all[pos], np.nan)
    lon = np.where(pos >= 0, lon_all[pos], np.nan)
    return lat, lon


def load_tgcn(speed_csv: Path, adj_csv: Path | None, start_time: str | None, freq: str | None,
              channels: list[str], null_value: float, units: list[str] | None = None) -> RawData:
    """T-GCN wide CSV (header = sensor ids, one row per step) + dense adjacency CSV.

    A first column named timestamp/time/date/datetime gives the timestamps; otherwise they
    are built from ``start_time`` + ``freq``.
    """
    speed_csv = Path(speed_csv)
    df = _read_csv(speed_csv)
    header = _raw_header(speed_csv)
    df.columns = header if len(header) == df.shape[1] else df.columns
    if len(df) == 0:
        raise DataError(f"{speed_csv}: header only, no rows")
    if str(df.columns[0]).lower() in TIME_COLUMNS:
        timestamps = _to_timestamps(df.iloc[:, 0], speed_csv, str(df.columns[0]))
        df = df.iloc[:, 1:]
    else:
        timestamps = _timestamps_from(start_time, freq, len(df), speed_csv)
    ids = [str(c) for c in df.columns]
    if not ids:
        raise DataError(f"{speed_csv}: no sensor columns")
    values = np.column_stack([_to_float(df.iloc[:, j], speed_csv, ids[j]) for j in range(len(ids))])  # (T, N)
    names = _channel_names(channels, 1)
    adjacency = None
    if adj_csv is not None:
        mat, adj_ids = read_dense_matrix(Path(adj_csv))
        if adj_ids is not None:
            adjacency = _reorder(mat, adj_ids, ids, Path(adj_csv))
        elif mat.shape[0] != len(ids):
            raise DataError(f"{adj_csv}: adjacency is {mat.shape[0]} x {mat.shape[1]} but {speed_csv} "
                            f"has {len(ids)} sensors")
        else:
            adjacency = mat
    return RawData(
        readings=_long_from_cube(values[:, :, None], timestamps, ids, names),
        sensors=_sensors_frame(ids),
        adjacency=adjacency,
        meta=_meta("tgcn", [speed_csv, adj_csv and Path(adj_csv)], null_value, names, units, freq,
                   "weight" if adjacency is not None else None),
    )


def _raw_header(path: Path) -> list[str]:
    """The header cells exactly as written (pandas renames repeated names to ``x.1``)."""
    if path.suffix.lower() != ".csv":
        return []
    try:
        with open(path, newline="") as fh:
            return [c.strip() for c in next(csv.reader(fh), [])]
    except UnicodeDecodeError:
        return []


def _read_table(path: Path) -> pd.DataFrame:
    """Readings as CSV or Parquet (by suffix); sensor ids and timestamps are kept as written."""
    _require_file(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... on a corrupt file
            raise DataError(f"{path}: not a readable Parquet file: {_reason(exc)}") from None
        df.columns = [str(c).strip() for c in df.columns]
        return df
    df = _read_csv(path, dtype={"sensor_id": str, "timestamp": str})
    header = _raw_header(path)
    if len(header) == df.shape[1]:
        df.columns = header
    return df


def load_byo(readings: Path, sensors_csv: Path | None, edges_csv: Path | None, channels: list[str],
             null_value: float, value_column: str | None = None,
             units: list[str] | None = None) -> RawData:
    """Your own data: long (``timestamp, sensor_id, value[, ...]``) or wide (``timestamp`` + sensors).

    Long: channel 0 is ``value_column``, else the column named ``channels[0]``, else ``value``
    (renamed to ``channels[0]``); every further column is one more channel under its own name.
    Sensor order: ``sensors.csv`` when given, else order of first appearance.
    """
    readings = Path(readings)
    df = _read_table(readings)
    _require_columns(df, ["timestamp"], readings)
    if len(df) == 0:
        raise DataError(f"{readings}: header only, no rows")
    if "sensor_id" in df.columns:
        long = _byo_long(df, readings, channels, value_column)
    else:
        long = _byo_wide(df, readings, channels)
    names = [c for c in long.columns if c not in ("timestamp", "sensor_id")]
    ids_seen = pd.unique(long["sensor_id"]).tolist()
    if sensors_csv is not None:
        sensors = _sensors_frame(*read_coords(Path(sensors_csv)))
    else:
        sensors = _sensors_frame(ids_seen)
    edges, kind = read_edges(Path(edges_csv)) if edges_csv is not None else (None, None)
    return RawData(
        readings=long,
        sensors=sensors,
        edges=edges,
        meta=_meta("byo", [readings, sensors_csv and Path(sensors_csv), edges_csv and Path(edges_csv)],
                   null_value, names, units, None, kind),
    )


def _byo_long(df: pd.DataFrame, path: Path, channels: list[str], value_column: str | None) -> pd.DataFrame:
    rest = [c for c in df.columns if c not in ("timestamp", "sensor_id")]
    first = channels[0] if channels else "value"
    if value_column is not None:
        _require_columns(df, [value_column], path)
        primary = value_column
    elif first in rest:
        primary = first
    elif "value" in rest:
        primary = "value"
    else:
        raise DataError(f"{path}: missing column 'value' (or {first!r}, the first of data.channels); "
                        f"found {list(df.columns)}")
    ordered = [primary] + [c for c in rest if c != primary]
    names = [first] + ordered[1:]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: column {first!r} would appear twice (value column {primary!r} is "
                        f"renamed to it); rename one of them")
    if df["sensor_id"].isna().any():
        i = int(np.flatnonzero(df["sensor_id"].isna().to_numpy())[0])
        raise DataError(f"{path}: column 'sensor_id' row {i}: empty sensor id")
    out = {"timestamp": _to_timestamps(df["timestamp"], path, "timestamp"),
           "sensor_id": df["sensor_id"].astype(str).str.strip().to_numpy(object)}
    for col, name in zip(ordered, names):
        out[name] = _to_float(df[col], path, col)
    return pd.DataFrame(out)


def _byo_wide(df: pd.DataFrame, path: Path, channels: list[str]) -> pd.DataFrame:
    cols = [j for j, c in enumerate(df.columns) if c != "timestamp"]
    if not cols:
        raise DataError(f"{path}: missing column 'sensor_id' (long format) or sensor columns (wide format)")
    ids = [str(df.columns[j]) for j in cols]
    timestamps = _to_timestamps(df["timestamp"], path, "timestamp")
    values = np.column_stack([_to_float(df.iloc[:, j], path, ids[k]) for k, j in enumerate(cols)])  # (T, N)
    return _long_from_cube(values[:, :, None], timestamps, ids, _channel_names(channels, 1))


# ---------------------------------------------------------------------------------------------
# dispatch on data.source


@dataclass(frozen=True)
class Role:
    """One file a source reads: its default glob patterns, tried in order, and whether it is needed."""

    patterns: tuple[str, ...]
    required: bool = True
    exclude: str | None = None  # skip file names containing this (case-insensitive)


ROLES: dict[str, dict[str, Role]] = {
    "pems": {"data": Role(("*.npz",)), "edges": Role(("*.csv",), False),
             "sensor_ids": Role(("*.txt",), False)},
    "metrla": {"data": Role(("*.h5",)), "adj": Role(("adj_mx.pkl", "*.pkl"), False),
               "locations": Role(("graph_sensor_locations.csv", "*location*.csv"), False)},
    "tgcn": {"speed": Role(("*speed*.csv", "*.csv"), exclude="adj"), "adj": Role(("*adj*.csv",), False)},
    "byo": {"readings": Role(("readings.*",)),
            "sensors": Role(("sensors.csv",), False), "edges": Role(("edges.csv",), False)},
}


def locate(source: str, folder: Path, files: dict[str, str]) -> dict[str, Path | None]:
    """Map each role of ``source`` to a file in ``folder``: ``files[role]`` if given, else a glob."""
    roles = ROLES[source]
    unknown = sorted(set(files) - set(roles))
    if unknown:
        raise DataError(f"data.files: unknown role(s) {unknown} for source {source!r}; known: {sorted(roles)}")
    found: dict[str, Path | None] = {}
    taken: set[Path] = {folder / name for name in files.values()}
    for role, spec in roles.items():
        if role in files:
            path = folder / files[role]
            found[role] = _require_file(path)
            continue
        found[role] = _glob_one(folder, role, spec, taken)
        if found[role] is not None:
            taken.add(found[role])
    return found


def _glob_one(folder: Path, role: str, spec: Role, taken: set[Path]) -> Path | None:
    """The one file matching the first pattern that matches any; several is an error."""
    for pattern in spec.patterns:
        hits = sorted(p for p in folder.glob(pattern) if p.is_file() and p not in taken)
        if spec.exclude:
            hits = [p for p in hits if spec.exclude not in p.name.lower()]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataError(f"{folder}: several files could be the {role!r} file "
                            f"{[p.name for p in hits]}; choose one with data.files.{role}")
    if spec.required:
        raise DataError(f"{folder}: no {role!r} file ({' or '.join(spec.patterns)}); "
                        f"name it with data.files.{role}")
    return None


def _download_all(cfg: DataConfig, folder: Path) -> None:
    """Fetch every file named in ``cfg.sha256`` / ``cfg.files`` from ``cfg.url`` into ``folder``."""
    names = list(dict.fromkeys([*cfg.files.values(), *cfg.sha256]))
    if not names:
        raise DataError(f"data.url={cfg.url}: list the files to download with their checksums "
                        f"in data.sha256 ({{file name: sha256}})")
    base = cfg.url.rstrip("/") + "/"
    for name in names:
        expected = cfg.sha256.get(name)
        target = folder / name
        if expected and target.is_file() and sha256_file(target) == expected.strip().lower():
            continue  # already here and intact
        fetch(base + urllib.parse.quote(name), folder, expected, name=name)


def load_source(cfg: DataConfig) -> tuple[RawData, dict[str, Path]]:
    """Read the source ``cfg`` describes; returns the raw data and {file name: local path}.

    ``cfg.path`` is the folder of the source files (or one of them); with ``cfg.url`` the files
    are first downloaded into it (default ``data/download/<dataset>``).  Every file named in
    ``cfg.sha256`` is verified before parsing.
    """
    if cfg.source == "synthetic":
        raise DataError("data.source=synthetic is generated by stlink.data.synthetic, not loaded")
    if cfg.source not in ROLES:
        raise DataError(f"data.source={cfg.source!r}: unknown source; one of synthetic, {', '.join(ROLES)}")
    files = dict(cfg.files)
    if cfg.url:
        folder = Path(cfg.path) if cfg.path else Path("data/download") / cfg.dataset
        folder.mkdir(parents=True, exist_ok=True)
        _download_all(cfg, folder)
    elif cfg.path:
        folder = Path(cfg.path)
        if folder.is_file():
            main = next(iter(ROLES[cfg.source]))
            files.setdefault(main, folder.name)
            folder = folder.parent
        elif not folder.is_dir():
            raise DataError(f"data.path={cfg.path}: no such file or folder")
    else:
        raise DataError(f"data.source={cfg.source}: set data.path (a folder) or data.url")
    located = locate(cfg.source, folder, files)
    names = {p.name for p in located.values() if p is not None}
    stray = sorted(set(cfg.sha256) - names)
    if stray:
        raise DataError(f"data.sha256 names {stray}, which are not among the source files {sorted(names)}")
    for path in located.values():
        if path is not None:
            check_digest(str(path), cfg.sha256.get(path.name), sha256_file(path))
    raw = _load(cfg, located)
    raw.meta["roles"] = {role: p.name for role, p in located.items() if p is not None}
    return raw, {p.name: p for p in located.values() if p is not None}


def _load(cfg: DataConfig, f: dict[str, Path | None]) -> RawData:
    """Call the loader of ``cfg.source`` on the located files."""
    if cfg.source == "pems":
        return load_pems(f["data"], f["edges"], cfg.start_time, cfg.freq, cfg.channels, cfg.null_value,
                         sensor_ids=f["sensor_ids"], units=cfg.units)
    if cfg.source == "metrla":
        return load_metrla(f["data"], f["adj"], f["locations"], cfg.channels, cfg.null_value, units=cfg.units)
    if cfg.source == "tgcn":
        return load_tgcn(f["speed"], f["adj"], cfg.start_time, cfg.freq, cfg.channels, cfg.null_value,
                         units=cfg.units)
    return load_byo(f["readings"], f["sensors"], f["edges"], cfg.channels, cfg.null_value, units=cfg.units)
