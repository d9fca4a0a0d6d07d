"""Bring your own: ``readings.csv|parquet`` (long or wide) + ``sensors.csv`` (coordinates optional)
+ ``edges.csv``.

Long readings list one row per (timestamp, sensor); a missing reading may be the null value, an
empty cell or an absent row (absent rows become missing readings in ``stlink prepare``; only a
timestamp absent for every sensor is a gap in the time index).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stlink.data.formats import RawData
from stlink.data.sources.common import (channel_names, long_from_cube, raw_header, read_csv, read_edges,
                                        read_sensors, reason, require_columns, require_file, sensors_frame,
                                        source_meta, to_float, to_timestamps)
from stlink.errors import DataError

if TYPE_CHECKING:
    from stlink.config import DataConfig


def load(cfg: "DataConfig", f: dict[str, Path | None]) -> RawData:
    return load_byo(f["readings"], f["sensors"], f["edges"], cfg.channels, cfg.null_value, units=cfg.units)


def read_table(path: Path) -> pd.DataFrame:
    """Readings as CSV or Parquet (by suffix); sensor ids and timestamps are kept as written.

    Parquet is read as data: Arrow extension types (whose readers may run code) are refused.
    """
    require_file(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
            odd = [f.name for f in schema if isinstance(f.type, pa.BaseExtensionType)]
            if odd:
                raise DataError(f"{path}: column(s) {odd} have an Arrow extension type; refused "
                                "(readings are plain numbers, text and timestamps)")
            df = pq.read_table(path).to_pandas()
        except DataError:
            raise
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... on a corrupt file
            raise DataError(f"{path}: not a readable Parquet file: {reason(exc)}") from None
        df.columns = [str(c).strip() for c in df.columns]
        return df
    df = read_csv(path, dtype={"sensor_id": str, "timestamp": str})
    header = raw_header(path)
    if len(header) == df.shape[1]:
        df.columns = header
    return df


def load_byo(readings: Path, sensors_csv: Path | None, edges_csv: Path | None, channels: list[str],
             null_value: float, value_column: str | None = None,
             units: list[str] | None = None) -> RawData:
    """Your own data: long (``timestamp, sensor_id, value[, ...]``) or wide (``timestamp`` + sensors).

    Long: channel 0 is ``value_column``, else the column named ``channels[0]``, else ``value``
    (renamed to ``channels[0]``); every further column is one more channel under its own name.
    Sensor order: ``sensors.csv`` when given (its ``lat``/``lon`` are optional), else order of
    first appearance.
    """
    readings = Path(readings)
    df = read_table(readings)
    require_columns(df, ["timestamp"], readings)
    if len(df) == 0:
        raise DataError(f"{readings}: header only, no rows")
    if "sensor_id" in df.columns:
        long = _byo_long(df, readings, channels, value_column)
    else:
        long = _byo_wide(df, readings, channels)
    names = [c for c in long.columns if c not in ("timestamp", "sensor_id")]
    ids_seen = pd.unique(long["sensor_id"]).tolist()
    if sensors_csv is not None:
        sensors = sensors_frame(*read_sensors(Path(sensors_csv)))
    else:
        sensors = sensors_frame(ids_seen)
    edges, kind = read_edges(Path(edges_csv)) if edges_csv is not None else (None, None)
    return RawData(
        readings=long,
        sensors=sensors,
        edges=edges,
        meta=source_meta("byo", [readings, sensors_csv and Path(sensors_csv), edges_csv and Path(edges_csv)],
                         null_value, names, units, None, kind),
    )


def _byo_long(df: pd.DataFrame, path: Path, channels: list[str], value_column: str | None) -> pd.DataFrame:
    rest = [c for c in df.columns if c not in ("timestamp", "sensor_id")]
    first = channels[0] if channels else "value"
    if value_column is not None:
        require_columns(df, [value_column], path)
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
    out = {"timestamp": to_timestamps(df["timestamp"], path, "timestamp"),
           "sensor_id": df["sensor_id"].astype(str).str.strip().to_numpy(object)}
    for col, name in zip(ordered, names):
        out[name] = to_float(df[col], path, col)
    return pd.DataFrame(out)


def _byo_wide(df: pd.DataFrame, path: Path, channels: list[str]) -> pd.DataFrame:
    cols = [j for j, c in enumerate(df.columns) if c != "timestamp"]
    if not cols:
        raise DataError(f"{path}: missing column 'sensor_id' (long format) or sensor columns (wide format)")
    ids = [str(df.columns[j]) for j in cols]
    timestamps = to_timestamps(df["timestamp"], path, "timestamp")
    values = np.column_stack([to_float(df.iloc[:, j], path, ids[k]) for k, j in enumerate(cols)])  # (T, N)
    return long_from_cube(values[:, :, None], timestamps, ids, channel_names(channels, 1))
