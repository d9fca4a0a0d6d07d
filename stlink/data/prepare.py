"""Pipeline step ``prepare``: validated raw readings -> the regular processed tensors.

Pivots the long readings onto the regular time grid, builds the mask of valid readings from
the raw values (before any scaling), the adjacency, the chronological splits and the training
scaler, then validates the result and swaps it in atomically.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stlink.config import Params
from stlink.data.formats import DataError, ProcessedData, RawData, load_raw, save_processed
from stlink.data.graph import build_adjacency
from stlink.data.windows import compute_splits, default_split, fit_scaler

log = logging.getLogger(__name__)


def infer_frequency(timestamps: pd.DatetimeIndex) -> pd.Timedelta:
    """The one step between consecutive timestamps; irregular or too-short indexes are errors."""
    if len(timestamps) < 2:
        raise DataError("need at least two timestamps to infer the frequency")
    steps = pd.Series(timestamps[1:] - timestamps[:-1])
    step = steps.mode().iloc[0]
    bad = np.flatnonzero(steps.to_numpy() != step.to_timedelta64())
    if len(bad):
        i = int(bad[0])
        raise DataError(f"irregular time index: step {steps.iloc[i]} after {timestamps[i]} "
                        f"(expected {step}; {len(bad)} irregular steps)")
    if step <= pd.Timedelta(0):
        raise DataError(f"timestamps are not increasing (step {step})")
    return step


def to_tensors(raw: RawData, null_value: float) -> tuple[np.ndarray, np.ndarray, pd.DatetimeIndex]:
    """Long readings -> values (T, N, C) float32 on the full time grid, mask (T, N), timestamps."""
    r = raw.readings
    ids = raw.sensor_ids
    times = pd.DatetimeIndex(np.sort(r["timestamp"].unique()))
    step = infer_frequency(times)
    grid = pd.date_range(times[0], times[-1], freq=step)
    t_idx = grid.get_indexer(pd.DatetimeIndex(r["timestamp"]))
    s_idx = pd.Index(ids).get_indexer(r["sensor_id"].astype(str))
    if (s_idx < 0).any():
        raise DataError(f"sensor {r['sensor_id'].astype(str)[s_idx < 0].iloc[0]!r} is in the readings but not in sensors")
    chans = raw.channels
    values = np.full((len(grid), len(ids), len(chans)), null_value, dtype=np.float32)  # (T, N, C)
    values[t_idx, s_idx] = r[chans].to_numpy(np.float32)
    target = values[..., 0]
    mask = np.isfinite(target) & (target != null_value)  # (T, N) valid readings, from raw values
    return values, mask, grid


def prepare(params: Params, raw_dir: Path | None = None, out_dir: Path | None = None,
            report_dir: Path | None = None) -> ProcessedData:
    from stlink.validation import validate_processed

    cfg = params.data
    raw = load_raw(raw_dir or params.raw_dir)
    values, mask, grid = to_tensors(raw, cfg.null_value)
    step_s = int(pd.Timedelta(grid[1] - grid[0]).total_seconds())
    if 86400 % step_s:
        raise DataError(f"frequency {step_s}s does not divide a day; time-of-day slots need it to")
    fractions = params.prepare.split or default_split(cfg.source)
    window = params.prepare.input_len + params.prepare.output_len
    splits = compute_splits(len(grid), fractions, min_len=window)
    coords = None
    if {"lat", "lon"} <= set(raw.sensors.columns):
        xy = raw.sensors[["lat", "lon"]].to_numpy(np.float64)
        coords = xy if np.isfinite(xy).all() else None
    meta = {
        "dataset": cfg.dataset,
        "source": raw.meta.get("source", cfg.source),
        "source_files": raw.meta.get("files", {}),
        "freq": pd.tseries.frequencies.to_offset(pd.Timedelta(seconds=step_s)).freqstr,
        "freq_seconds": step_s,
        "steps_per_day": 86400 // step_s,
        "null_value": cfg.null_value,
        "channels": raw.channels,
        "units": raw.meta.get("units", cfg.units)[: len(raw.channels)],
        "n_steps": len(grid),
        "n_sensors": len(raw.sensor_ids),
        "start": str(grid[0]),
        "end": str(grid[-1]),
        "split_fractions": fractions,
        "splits": splits,
        "scaler": fit_scaler(values, mask, splits["train"]),
        "adjacency": vars(cfg.adjacency),
        "valid_fraction": float(mask.mean()),
    }
    data = ProcessedData(values=values, mask=mask, timestamps=grid.to_numpy("datetime64[ns]"),
                         adjacency=build_adjacency(raw, cfg.adjacency), sensor_ids=raw.sensor_ids,
                         meta=meta, coords=coords)
    out = Path(out_dir or params.processed_dir)
    save_processed(data, out, check=lambda tmp: validate_processed(
        tmp, params.validation, report_dir=report_dir, name="processed"))
    log.info("prepared %s: T=%d N=%d C=%d, %s, splits %s -> %s", cfg.dataset, *values.shape,
             meta["freq"], splits, out)
    return data
