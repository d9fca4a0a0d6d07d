"""DCRNN METR-LA / PEMS-BAY: ``metr-la.h5`` (pandas HDF, DatetimeIndex x sensor ids) + ``adj_mx.pkl``
(+ ``graph_sensor_locations.csv``).

The HDF file is read with h5py, never with ``pd.HDFStore``/PyTables: those unpickle object
columns and pickled attributes, which runs whatever code the file carries.  Here only numeric
and fixed-length string arrays are read; an object (pickled) array is refused before anything
is decoded, and the few pickled attributes of pandas' ``table`` format (lists of column names)
go through an unpickler that refuses every global.  ``adj_mx.pkl`` likewise builds only numpy
arrays and plain containers.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stlink.data.formats import RawData
from stlink.data.sources.common import (SafeUnpickler, channel_names, duplicates, long_from_cube, read_coords,
                                        reason, reorder, require_file, safe_unpickle, sensors_frame, source_meta,
                                        to_float, to_timestamps)
from stlink.errors import DataError

if TYPE_CHECKING:
    from stlink.config import DataConfig


def load(cfg: "DataConfig", f: dict[str, Path | None]) -> RawData:
    return load_metrla(f["data"], f["adj"], f["locations"], cfg.channels, cfg.null_value, units=cfg.units)


def load_metrla(h5: Path, adj_pkl: Path | None, locations_csv: Path | None, channels: list[str],
                null_value: float, units: list[str] | None = None) -> RawData:
    """DCRNN METR-LA / PEMS-BAY: ``h5`` (DatetimeIndex x sensor ids) + ``adj_mx.pkl`` + locations."""
    h5 = require_file(Path(h5))
    df = read_hdf(h5)
    ids = [str(c).strip() for c in df.columns]
    if not ids or len(df) == 0:
        raise DataError(f"{h5}: the table is empty ({len(df)} rows x {len(ids)} sensor columns)")
    timestamps = to_timestamps(df.index, h5, "index")
    values = np.column_stack([to_float(df.iloc[:, j], h5, ids[j]) for j in range(len(ids))])  # (T, N)
    names = channel_names(channels, 1)
    adjacency = None
    if adj_pkl is not None:
        graph_ids, mat = read_dcrnn_pickle(Path(adj_pkl))
        adjacency = reorder(mat, graph_ids, ids, Path(adj_pkl))
    lat = lon = None
    if locations_csv is not None:
        lat, lon = read_locations(Path(locations_csv), ids)
    freq = _declared_freq(df.index)
    return RawData(
        readings=long_from_cube(values[:, :, None], timestamps, ids, names),
        sensors=sensors_frame(ids, lat, lon),
        adjacency=adjacency,
        meta=source_meta("metrla", [h5, adj_pkl and Path(adj_pkl), locations_csv and Path(locations_csv)],
                         null_value, names, units, freq, "weight" if adjacency is not None else None),
    )


def _declared_freq(index: pd.Index) -> str | None:
    """The index's regular step as a pandas frequency string, None when irregular or too short."""
    if not isinstance(index, pd.DatetimeIndex) or len(index) < 3:
        return None
    steps = np.unique(np.diff(index.values))                      # timedelta64, in the index's unit
    if len(steps) != 1 or steps[0] <= np.timedelta64(0):
        return None
    return pd.tseries.frequencies.to_offset(pd.Timedelta(steps[0])).freqstr


# --- pandas HDF without pandas: h5py, numeric and fixed-length string arrays only --------------

def read_hdf(path: Path) -> pd.DataFrame:
    """The first pandas frame (``fixed`` or ``table`` format) of an HDF file, as a DataFrame."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            groups = [k for k in f.keys() if isinstance(f.get(k, getlink=False), h5py.Group)]
            frames = [k for k in groups if _attr(f[k], "pandas_type") in ("frame", "frame_table")]
            if not frames:
                raise DataError(f"{path}: no pandas table in this HDF file (groups: {groups[:10]})")
            group = f[frames[0]]
            if _attr(group, "pandas_type") == "frame":
                return _read_fixed(group, path)
            return _read_table_format(group, path)
    except DataError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, TypeError ... on a corrupt file
        raise DataError(f"{path}: not a readable pandas HDF file: {reason(exc)}") from None


def _attr(node: Any, name: str) -> Any:
    """An attribute as a Python value (bytes decoded); None when absent."""
    if name not in node.attrs:
        return None
    value = node.attrs[name]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _array(group: Any, key: str, path: Path) -> np.ndarray:
    """Dataset ``key`` of ``group``; a pickled-object (variable-length / ObjectAtom) array is refused."""
    if key not in group:
        raise DataError(f"{path}: {group.name}/{key}: missing")
    import h5py

    ds = group[key]
    if ds.dtype.kind == "O" or h5py.check_vlen_dtype(ds.dtype) is not None or _attr(ds, "PSEUDOATOM") == "object" \
            or _attr(ds, "CLASS") == "VLARRAY":
        raise DataError(f"{path}: {ds.name} holds pickled Python objects; refused (data files are data, "
                        "not code: store numbers and fixed-length strings, e.g. pandas to_hdf of a float frame)")
    return ds[()]


def _labels(group: Any, key: str, path: Path) -> pd.Index:
    """An axis of a fixed-format frame: strings, integers or timestamps, from its ``kind``."""
    values = _array(group, key, path)
    kind = _attr(group[key], "kind") or ""
    if kind.startswith("datetime64"):
        unit = kind[len("datetime64"):] or "[ns]"
        index = pd.DatetimeIndex(values.astype(f"datetime64{unit}"))
        tz = _attr(group[key], "tz")
        if isinstance(tz, str) and tz:
            index = index.tz_localize("UTC")  # pandas stores UTC instants; the zone only labels them
        return index
    if values.dtype.kind == "S":
        return pd.Index([v.decode("utf-8", errors="replace") for v in values], dtype=object)
    return pd.Index(values)


def _read_fixed(group: Any, path: Path) -> pd.DataFrame:
    """pandas ``format='fixed'`` frame: axis0 (columns), axis1 (index), blocks of values."""
    columns = _labels(group, "axis0", path)
    index = _labels(group, "axis1", path)
    parts: dict[str, np.ndarray] = {}
    for b in range(int(_attr(group, "nblocks") or 0)):
        items = _labels(group, f"block{b}_items", path)
        values = _array(group, f"block{b}_values", path)
        if values.dtype.kind not in "biuf":
            raise DataError(f"{path}: {group.name}/block{b}_values: {values.dtype} values, expected numbers")
        if not _attr(group[f"block{b}_values"], "transposed"):
            values = values.T                                             # (rows, items)
        if values.shape != (len(index), len(items)):
            raise DataError(f"{path}: {group.name}/block{b}_values has shape {values.shape}, "
                            f"expected {(len(index), len(items))}")
        for j, name in enumerate(items):
            parts[str(name)] = values[:, j]
    missing = [c for c in map(str, columns) if c not in parts]
    if missing:
        raise DataError(f"{path}: columns {missing[:5]} have no values")
    return pd.DataFrame({str(c): parts[str(c)] for c in columns}, index=index)


def _read_table_format(group: Any, path: Path) -> pd.DataFrame:
    """pandas ``format='table'`` frame: one compound dataset ``table`` (index + values blocks)."""
    if "table" not in group:
        raise DataError(f"{path}: {group.name}: no 'table' dataset")
    ds = group["table"]
    where = f"{path}: {ds.name}"
    names = ds.dtype.names or ()
    if "index" not in names:
        raise DataError(f"{where}: no index column")
    rows = _array(group, "table", path)
    kind = _attr(ds, "index_kind") or ""
    index = rows["index"]
    index = pd.DatetimeIndex(index.astype(f"datetime64{kind[len('datetime64'):] or '[ns]'}")) \
        if kind.startswith("datetime64") else pd.Index(index)
    cols: dict[str, np.ndarray] = {}
    for field in names:
        if field == "index":
            continue
        raw_kind = ds.attrs.get(f"{field}_kind")
        labels = safe_unpickle(bytes(raw_kind), f"{where} attribute {field}_kind") if raw_kind is not None \
            else [field]
        block = rows[field]
        if block.dtype.kind not in "biuf":
            raise DataError(f"{where}: column block {field} is {block.dtype}, expected numbers")
        block = block.reshape(len(rows), -1)                              # (rows, items)
        if not isinstance(labels, list) or len(labels) != block.shape[1]:
            raise DataError(f"{where}: {field} names {labels!r} do not match its {block.shape[1]} columns")
        for j, name in enumerate(labels):
            cols[str(name)] = block[:, j]
    return pd.DataFrame(cols, index=index)


# --- the DCRNN graph pickle and the locations -------------------------------------------------

def read_dcrnn_pickle(path: Path) -> tuple[list[str], np.ndarray]:
    """DCRNN ``adj_mx.pkl`` (sensor_ids, sensor_id_to_ind, adj_mx) -> (ids in matrix order, matrix)."""
    require_file(path)
    obj = safe_unpickle(Path(path).read_bytes(), f"{path}: not a readable DCRNN pickle", SafeUnpickler)
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


def read_locations(path: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) in ``ids`` order from a locations CSV; NaN for sensors it does not list."""
    loc_ids, lat_all, lon_all = read_coords(path)
    dup = duplicates(loc_ids)
    if dup:
        raise DataError(f"{path}: sensor ids listed twice: {dup[:10]}")
    pos = pd.Index(loc_ids).get_indexer(ids)                      # (N,) -1 where unknown
    lat = np.where(pos >= 0, lat_all[pos], np.nan)
    lon = np.where(pos >= 0, lon_all[pos], np.nan)
    return lat, lon
