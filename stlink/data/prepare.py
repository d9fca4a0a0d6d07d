"""Pipeline step ``prepare``: validated raw readings -> the regular processed tensors.

Refuses raw data whose validation report is missing, failed or about other data (the report
records the raw folder's fingerprint); leaves out the sensors validation dropped.  Then pivots
the long readings onto the regular time grid (absent rows become missing readings), builds the
mask of valid readings from the raw values (before any scaling), the adjacency, the
chronological splits and the training scaler, validates the result and swaps it in atomically.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stlink.config import Params
from stlink.data.formats import DataError, ProcessedData, RawData, load_raw, save_processed, without_sensors
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
    dup = pd.DataFrame({"t": t_idx, "s": s_idx}).duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"readings: sensor {r['sensor_id'].iloc[i]!r} at {r['timestamp'].iloc[i]} appears more than "
                        f"once ({int(dup.sum())} duplicated rows); validation refuses this, prepare will not pick one")
    chans = raw.channels
    values = np.full((len(grid), len(ids), len(chans)), null_value, dtype=np.float32)  # (T, N, C)
    values[t_idx, s_idx] = r[chans].to_numpy(np.float32)
    target = values[..., 0]
    mask = np.isfinite(target) & (target != null_value)  # (T, N) valid readings, from raw values
    return values, mask, grid


def validated_report(raw: RawData, raw_dir: Path, report_dir: Path) -> dict:
    """The passed validation report (``<report_dir>/raw.json``) of exactly this raw data, or a
    ``DataError``: prepare never builds tensors from data that was not validated as it is now."""
    report_path = Path(report_dir) / "raw.json"
    failed_path = Path(report_dir) / "raw.failed.json"
    failed = _read_report(failed_path)
    if failed and failed.get("data_fingerprint") == raw.fingerprint:
        raise DataError(f"{raw_dir} failed validation (see {failed_path}); prepare refuses it: fix the source and "
                        "run `stlink ingest` and `stlink validate` again")
    report = _read_report(report_path)
    if report is None:
        raise DataError(f"{report_path}: no validation report of {raw_dir}; run `stlink validate` first "
                        "(prepare reads only validated data)")
    if report.get("success") is not True:
        raise DataError(f"{report_path}: validation did not pass; prepare refuses {raw_dir}")
    if report.get("data_fingerprint") != raw.fingerprint:
        raise DataError(f"{report_path} is the report of other data than {raw_dir} holds now (ingested since?); "
                        "run `stlink validate` first")
    return report


def _read_report(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable validation report: {exc}") from None


def prepare(params: Params, raw_dir: Path | None = None, out_dir: Path | None = None,
            report_dir: Path | None = None) -> ProcessedData:
    """``report_dir`` (default ``reports/<dataset>/validation``) holds the raw report this checks
    first and receives the processed report."""
    from stlink.validation import validate_processed

    cfg = params.data
    raw_dir = Path(raw_dir or params.raw_dir)
    report_dir = Path(report_dir or params.report_dir / "validation")
    raw = load_raw(raw_dir)
    report = validated_report(raw, raw_dir, report_dir)
    dropped = [d["sensor_id"] for d in report.get("dropped_sensors", [])]
    raw = without_sensors(raw, dropped)
    if dropped:
        log.warning("leaving out %d sensors that validation dropped (validation.sparse_sensors=drop): %s",
                    len(dropped), ", ".join(dropped[:10]))
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
        "dropped_sensors": dropped,
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
