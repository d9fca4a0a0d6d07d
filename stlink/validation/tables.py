"""The tables the suites run on, derived from the raw and processed data (pandas/numpy only).

GX checks one dataframe at a time and has no expectation for, say, "the time index has no gap";
so each property becomes a column of a small derived table (``time_steps.step_seconds``,
``missing.missing_fraction``, ``shapes.size``), which a plain expectation can then judge and
whose failing rows name the sensor and timestamp.  Every table has a fresh ``RangeIndex``, so
GX's unexpected index list points straight at the failing rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from stlink.data.formats import DataError, ProcessedData, RawData

ALL_SENSORS = "(all sensors)"  # sensor_id of the time-index rows over all sensors


def ids(series: pd.Series) -> pd.Series:
    """Sensor ids as strings, keeping missing ones missing (``astype(str)`` would write 'nan')."""
    return series.astype("string").str.strip().astype(object).where(series.notna(), None)


def require_columns(df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; found {list(df.columns)}")


# --- raw --------------------------------------------------------------------------------------

def readings_table(raw: RawData) -> pd.DataFrame:
    """The long readings with parsed timestamps (unparseable -> NaT), str ids and float channels."""
    require_columns(raw.readings, ["timestamp", "sensor_id"], "readings")
    if not raw.channels:
        raise DataError("readings: no channel column besides timestamp and sensor_id")
    r = raw.readings
    out = pd.DataFrame({"timestamp": pd.to_datetime(r["timestamp"], errors="coerce"),
                        "sensor_id": ids(r["sensor_id"])})
    for ch in raw.channels:
        out[ch] = pd.to_numeric(r[ch], errors="coerce").astype(np.float64)  # text -> NaN
    return out.reset_index(drop=True)


def sensors_table(raw: RawData) -> pd.DataFrame:
    require_columns(raw.sensors, ["sensor_id"], "sensors")
    return raw.sensors.assign(sensor_id=ids(raw.sensors["sensor_id"])).reset_index(drop=True)


def edges_table(raw: RawData) -> pd.DataFrame | None:
    if raw.edges is None:
        return None
    require_columns(raw.edges, ["from", "to", "value"], "edges")
    e = raw.edges
    return pd.DataFrame({"from": ids(e["from"]), "to": ids(e["to"]),
                         "value": pd.to_numeric(e["value"], errors="coerce").astype(np.float64),
                         "kind": str(raw.meta.get("value_kind") or "distance")})


def time_steps(readings: pd.DataFrame) -> pd.DataFrame:
    """Consecutive distinct timestamps of the global time index (all sensors together).

    Columns: sensor_id (``ALL_SENSORS``), timestamp, previous_timestamp, step_seconds.  A
    timestamp absent for one sensor only is a missing reading of that sensor (``missing_table``
    counts it), not a gap: only a timestamp absent for every sensor is a gap in the index.
    """
    times = np.sort(readings["timestamp"].dropna().unique())
    steps = pd.DataFrame({"sensor_id": ALL_SENSORS, "timestamp": times[1:], "previous_timestamp": times[:-1]})
    steps["step_seconds"] = (steps["timestamp"] - steps["previous_timestamp"]).dt.total_seconds()
    return steps


def frequency_seconds(steps: pd.DataFrame) -> float:
    """The most common step over all sensors (0 when there are fewer than two timestamps)."""
    overall = steps.loc[steps["sensor_id"] == ALL_SENSORS, "step_seconds"]
    return float(overall.mode().iloc[0]) if len(overall) else 0.0


def with_off_grid(steps: pd.DataFrame, freq_seconds: float) -> pd.DataFrame:
    """Add ``off_grid_seconds`` = step mod frequency (0 for a regular step or a whole-step gap)."""
    return steps.assign(off_grid_seconds=np.mod(steps["step_seconds"], freq_seconds) if freq_seconds > 0 else 0.0)


def missing_table(readings: pd.DataFrame, channels: list[str], sensor_ids: list[str],
                  null_value: float) -> pd.DataFrame:
    """Per sensor (sensors table first, then sensors only in the readings) and channel:
    n_expected distinct timestamps overall, n_valid with a finite non-null reading, missing_fraction."""
    n_expected = int(readings["timestamp"].nunique())
    every = list(dict.fromkeys([*sensor_ids, *readings["sensor_id"].dropna().unique()]))
    parts = []
    for ch in channels:
        v = readings[ch].to_numpy()
        valid = np.isfinite(v) & (v != null_value)  # (rows,)
        n_valid = (readings.loc[valid].groupby("sensor_id")["timestamp"].nunique()
                   .reindex(every, fill_value=0).to_numpy())
        frac = 1.0 - n_valid / n_expected if n_expected else np.ones(len(every))
        parts.append(pd.DataFrame({"sensor_id": every, "channel": ch, "n_expected": n_expected,
                                   "n_valid": n_valid, "missing_fraction": frac}))
    return pd.concat(parts, ignore_index=True)


def adjacency_shape(adjacency: np.ndarray) -> pd.DataFrame:
    """One row per axis of the dense adjacency: axis name and size."""
    names = ["rows", "cols"] if adjacency.ndim == 2 else [f"axis {i}" for i in range(adjacency.ndim)]
    return pd.DataFrame({"axis": names, "size": list(adjacency.shape)})


def adjacency_entries(adjacency: np.ndarray, sensor_ids: list[str]) -> pd.DataFrame:
    """Square (N, N) adjacency -> one row per entry: from (row sensor), to (column sensor), value."""
    n = adjacency.shape[0]
    names = np.asarray(sensor_ids, dtype=object)  # (N,)
    return pd.DataFrame({"from": np.repeat(names, n), "to": np.tile(names, n),
                         "value": np.asarray(adjacency, dtype=np.float64).ravel()})


# --- processed --------------------------------------------------------------------------------

def shapes_table(data: ProcessedData) -> pd.DataFrame:
    """One row per array axis: array, axis, size, expected (from meta.json, else the arrays)."""
    meta = data.meta
    t = int(meta.get("n_steps", len(data.timestamps)))
    n = int(meta.get("n_sensors", len(data.sensor_ids)))
    c = len(meta["channels"]) if "channels" in meta else int(data.values.shape[-1])
    rows = [("values", "ndim", data.values.ndim, 3), ("mask", "ndim", data.mask.ndim, 2),
            ("timestamps", "ndim", data.timestamps.ndim, 1), ("adjacency", "ndim", data.adjacency.ndim, 2),
            ("sensor_ids", "N", len(data.sensor_ids), n)]
    rows += _axes("values", data.values.shape, [("T", t), ("N", n), ("C", c)])
    rows += _axes("mask", data.mask.shape, [("T", t), ("N", n)])
    rows += _axes("timestamps", data.timestamps.shape, [("T", t)])
    rows += _axes("adjacency", data.adjacency.shape, [("rows", n), ("cols", n)])
    if data.coords is not None:
        rows += _axes("coords", data.coords.shape, [("N", n), ("lat/lon", 2)])
    return pd.DataFrame(rows, columns=["array", "axis", "size", "expected"])


def _axes(array: str, shape: tuple[int, ...], expected: list[tuple[str, int]]) -> list[tuple]:
    """(array, axis, size, expected) rows; an absent axis has size -1."""
    return [(array, name, shape[i] if i < len(shape) else -1, size) for i, (name, size) in enumerate(expected)]


def finite_table(data: ProcessedData) -> pd.DataFrame:
    """Per sensor: NaN and inf counts of values[..., c] (each channel) and of its adjacency row.

    ``first_at`` is the first bad timestamp (values) or column sensor (adjacency), '' if none.
    """
    sensors = np.asarray(data.sensor_ids, dtype=object)
    times = pd.DatetimeIndex(data.timestamps).astype(str).to_numpy()
    parts = [_bad_counts(f"values[{ch}]", np.asarray(data.values[..., c]), sensors, times)  # (T, N)
             for c, ch in enumerate(data.meta.get("channels", range(data.values.shape[-1])))]
    parts.append(_bad_counts("adjacency", np.asarray(data.adjacency).T, sensors, sensors))  # (N cols, N rows)
    return pd.concat(parts, ignore_index=True)


def _bad_counts(array: str, x: np.ndarray, sensors: np.ndarray, along: np.ndarray) -> pd.DataFrame:
    """x (K, N): per column n, NaN and inf counts and the label in ``along`` of the first bad row."""
    nan, inf = np.isnan(x), np.isinf(x)  # (K, N)
    bad = nan | inf
    first = np.where(bad.any(axis=0), along[bad.argmax(axis=0)], "")
    return pd.DataFrame({"array": array, "sensor_id": sensors, "n_nan": nan.sum(axis=0),
                         "n_inf": inf.sum(axis=0), "first_at": first})


def mask_table(data: ProcessedData, null_value: float) -> pd.DataFrame:
    """Per sensor: readings where mask != (values[..., 0] finite and != null value), first such time."""
    target = np.asarray(data.values[..., 0])  # (T, N)
    expected = np.isfinite(target) & (target != null_value)
    wrong = np.asarray(data.mask, dtype=bool) != expected  # (T, N)
    times = pd.DatetimeIndex(data.timestamps).astype(str).to_numpy()
    first = np.where(wrong.any(axis=0), times[wrong.argmax(axis=0)], "")
    return pd.DataFrame({"sensor_id": list(data.sensor_ids), "n_mismatch": wrong.sum(axis=0), "first_at": first})


def processed_time_steps(timestamps: np.ndarray) -> pd.DataFrame:
    """timestamp, previous_timestamp, step_seconds for consecutive entries of timestamps.npy."""
    ts = pd.Series(pd.DatetimeIndex(timestamps))
    steps = pd.DataFrame({"timestamp": ts.iloc[1:].to_numpy(), "previous_timestamp": ts.iloc[:-1].to_numpy()})
    steps["step_seconds"] = (steps["timestamp"] - steps["previous_timestamp"]).dt.total_seconds()
    return steps
