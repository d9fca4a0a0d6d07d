"""Pipeline checks ``validate_raw`` and ``validate_processed``: derived tables + suites + reports.

On success the report is written to ``<report_dir>/<name>.json`` (and Data Docs HTML to
``<report_dir>/<name>_docs/``); on failure to ``<name>.failed.json`` (``<name>.failed_docs/``) and
``ValidationFailed`` is raised, so the last good report stays exactly as it was.  Every write is
atomic (``stlink.io``).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from stlink.config import ValidationConfig
from stlink.data.formats import DataError, RawData, load_processed, without_sensors
from stlink.io import atomic_dir, write_json
from stlink.validation import tables as tb
from stlink.validation.report import ValidationFailed, expectation_entry, jsonable, summary_message
from stlink.validation.runner import Session, session
from stlink.validation.suites import expand_channels, fill_row_conditions, load_suites

log = logging.getLogger(__name__)

Tables = dict[str, Callable[[], "pd.DataFrame | None"]]
PROCESSED_FILES = ["values.npy", "mask.npy", "timestamps.npy", "adjacency.npy", "sensor_ids.json", "meta.json"]


def validate_raw(raw: RawData, cfg: ValidationConfig, report_dir: Path | None = None,
                 name: str = "raw") -> dict[str, Any]:
    """Run the ``validation/raw_*.json`` suites on a parsed source; the report dict on success.

    ``cfg.sparse_sensors="drop"``: sensors missing more than ``cfg.max_missing_fraction`` of their
    readings are left out first (with their edges) and listed in the report's ``dropped_sensors``
    with a warning; ``stlink prepare`` leaves out the same ones.  ``"fail"``: they fail the run.
    The report records the data's ``fingerprint`` (``RawData.fingerprint``), so that prepare can
    tell that the report is about the raw data it is given.
    """
    null_value = float(raw.meta.get("null_value", 0.0))
    raw, extra = drop_sparse_sensors(raw, cfg, null_value)
    extra["data_fingerprint"] = raw.fingerprint
    readings = tb.readings_table(raw)
    sensors = tb.sensors_table(raw)
    steps = tb.time_steps(readings)
    freq = tb.frequency_seconds(steps)
    all_ids = sensors["sensor_id"].tolist()  # sensors order, None where an id is missing
    known = [s for s in all_ids if s is not None]
    adjacency = None if raw.adjacency is None else np.asarray(raw.adjacency)
    parameters = {
        "null_value": null_value,
        "infinities": [float("inf"), float("-inf")],
        "sensor_ids": known,
        "reading_sensor_ids": readings["sensor_id"].dropna().unique().tolist(),
        "n_sensors": len(all_ids),
        "freq_seconds": freq,
        "max_missing_fraction": cfg.max_missing_fraction,
        **channel_bounds(raw.channels, cfg),
    }
    tables: Tables = {
        "readings": lambda: readings,
        "time_steps": lambda: tb.with_off_grid(steps, freq),
        "missing": lambda: tb.missing_table(readings, raw.channels, known, null_value),
        "sensors": lambda: sensors,
        "edges": lambda: tb.edges_table(raw),
        "adjacency_shape": lambda: None if adjacency is None else tb.adjacency_shape(adjacency),
        "adjacency": lambda: None if adjacency is None else tb.adjacency_entries(adjacency, all_ids),
    }
    return run_suites(name, "raw", tables, parameters, raw.channels, cfg, report_dir, extra)


def drop_sparse_sensors(raw: RawData, cfg: ValidationConfig, null_value: float) -> tuple[RawData, dict[str, Any]]:
    """(raw without its sparse sensors, report fields) under ``sparse_sensors=drop``; else unchanged.

    A sensor is sparse when any channel misses more than ``max_missing_fraction`` of the
    timestamps (null value, NaN or an absent row).  When every sensor is sparse none is dropped:
    the ``raw_missing`` suite then fails naming them.
    """
    extra: dict[str, Any] = {"dropped_sensors": [], "warnings": []}
    if cfg.sparse_sensors != "drop":
        return raw, extra
    readings = tb.readings_table(raw)
    known = [s for s in tb.sensors_table(raw)["sensor_id"].tolist() if s is not None]
    missing = tb.missing_table(readings, raw.channels, known, null_value)
    worst = missing.groupby("sensor_id", sort=False)["missing_fraction"].max()      # per sensor
    sparse = worst[worst > cfg.max_missing_fraction]
    if sparse.empty or len(sparse) == len(worst):
        return raw, extra
    extra["dropped_sensors"] = [{"sensor_id": str(s), "missing_fraction": round(float(f), 6)}
                                for s, f in sparse.items()]
    shown = ", ".join(f"{s} ({f:.0%})" for s, f in list(sparse.items())[:10])
    more = f" and {len(sparse) - 10} more" if len(sparse) > 10 else ""
    extra["warnings"] = [f"dropped {len(sparse)} of {len(worst)} sensors missing more than "
                         f"validation.max_missing_fraction={cfg.max_missing_fraction} of their readings, "
                         f"with their graph edges (validation.sparse_sensors=drop): {shown}{more}"]
    log.warning("%s", extra["warnings"][0])
    return without_sensors(raw, set(sparse.index)), extra


def channel_bounds(channels: list[str], cfg: ValidationConfig) -> dict[str, float]:
    """``min_<channel>`` / ``max_<channel>`` suite parameters from ``validation.bounds``."""
    out: dict[str, float] = {}
    for ch in channels:
        bounds = cfg.bounds.get(ch)
        if bounds is None or len(bounds) != 2:
            raise DataError(f"readings: channel {ch!r} has no physical bounds; add "
                            f"validation.bounds.{ch}: [min, max] to params.yaml (known: {sorted(cfg.bounds)})")
        out[f"min_{ch}"], out[f"max_{ch}"] = float(bounds[0]), float(bounds[1])
    return out


def validate_processed(folder: Path, cfg: ValidationConfig, report_dir: Path | None = None,
                       name: str = "processed") -> dict[str, Any]:
    """Run the ``validation/processed_*.json`` suites on a processed dataset folder."""
    folder = Path(folder)
    absent = [f for f in PROCESSED_FILES if not (folder / f).exists()]
    if absent:
        raise DataError(f"{folder}: processed dataset lacks {absent}")
    data = load_processed(folder, mmap=True)
    parameters = {"freq_seconds": meta_freq_seconds(data.meta, folder),
                  "null_value": float(data.meta.get("null_value", 0.0))}
    tables: Tables = {
        "shapes": lambda: tb.shapes_table(data),
        "finite": lambda: tb.finite_table(data),
        "mask": lambda: tb.mask_table(data, parameters["null_value"]),
        "time_steps": lambda: tb.processed_time_steps(data.timestamps),
    }
    return run_suites(name, "processed", tables, parameters, list(data.meta.get("channels", [])), cfg, report_dir)


def meta_freq_seconds(meta: dict[str, Any], folder: Path) -> float:
    """The step of meta.json: ``freq_seconds``, else the pandas frequency string ``freq``."""
    if "freq_seconds" in meta:
        return float(meta["freq_seconds"])
    if "freq" not in meta:
        raise DataError(f"{folder / 'meta.json'}: no freq / freq_seconds")
    try:
        return pd.Timedelta(pd.tseries.frequencies.to_offset(meta["freq"])).total_seconds()
    except (ValueError, TypeError):
        raise DataError(f"{folder / 'meta.json'}: freq {meta['freq']!r} is not a fixed frequency") from None


def run_suites(name: str, prefix: str, tables: Tables, parameters: dict[str, Any], channels: list[str],
               cfg: ValidationConfig, report_dir: Path | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every ``<prefix>_*.json`` suite on its table; write the report (with the ``extra``
    fields); raise on failure."""
    suites = [fill_row_conditions(expand_channels(s, channels), parameters) for s in load_suites(prefix)]
    for suite in suites:
        if suite["meta"]["table"] not in tables:
            raise DataError(f"suite {suite['name']}: unknown meta.table {suite['meta']['table']!r}; "
                            f"known: {sorted(tables)}")
    report: dict[str, Any] = {"name": name, "parameters": jsonable(parameters), "suites": {}, **jsonable(extra or {})}
    with session() as gx:
        report["great_expectations_version"] = gx.gx_version
        for suite in suites:
            report["suites"][suite["name"]] = run_suite(gx, suite, tables, report["suites"], parameters, cfg)
        report["success"] = all(s["success"] is not False for s in report["suites"].values())
        if report_dir is not None:
            docs = Path(report_dir) / (f"{name}_docs" if report["success"] else f"{name}.failed_docs")
            with atomic_dir(docs) as tmp:
                if cfg.data_docs:
                    gx.build_docs(tmp)
                else:  # the folder is a DVC output of `validate`: it must exist either way
                    (tmp / "README.txt").write_text("Data Docs not built (validation.data_docs: false); "
                                                    f"the report is {name}.json\n")
    write_report(report, report_dir)
    return report


def run_suite(gx: Session, suite: dict[str, Any], tables: Tables, done: dict[str, dict[str, Any]],
              parameters: dict[str, Any], cfg: ValidationConfig) -> dict[str, Any]:
    """One suite's report entry; skipped when a required suite in ``done`` did not pass or there
    is no such table in this dataset (e.g. no edge list when the graph is a dense matrix)."""
    meta = suite["meta"]
    entry: dict[str, Any] = {"table": meta["table"], "rows": None, "skipped": None, "success": None,
                             "expectations": []}
    blocked = [r for r in meta.get("requires", []) if not done[r]["success"]]
    if blocked:
        failed = any(done[r]["success"] is False for r in blocked)
        entry["skipped"] = f"{', '.join(blocked)} {'failed' if failed else 'was skipped'}"
        return entry
    table = tables[meta["table"]]()
    if table is None:
        entry["skipped"] = f"no {meta['table']} in this dataset"
        return entry
    results = gx.run(suite, table, parameters, cfg.failed_rows_sample)
    entry["rows"] = len(table)
    entry["expectations"] = [expectation_entry(r, table, meta["table"], meta.get("keys", []), cfg.failed_rows_sample)
                             for r in results]
    entry["success"] = all(e["success"] for e in entry["expectations"])
    return entry


def write_report(report: dict[str, Any], report_dir: Path | None) -> None:
    """Success: ``<name>.json`` (stale failure outputs removed). Failure: ``<name>.failed.json``, raise."""
    name = report["name"]
    if report["success"]:
        if report_dir is not None:
            write_json(Path(report_dir) / f"{name}.json", report)
            (Path(report_dir) / f"{name}.failed.json").unlink(missing_ok=True)
            shutil.rmtree(Path(report_dir) / f"{name}.failed_docs", ignore_errors=True)
        n = sum(len(s["expectations"]) for s in report["suites"].values())
        log.info("%s validation passed: %d expectations in %d suites", name, n, len(report["suites"]))
        return
    where = "not written (no report_dir)"
    if report_dir is not None:
        path = Path(report_dir) / f"{name}.failed.json"
        write_json(path, report)
        where = str(path)
    raise ValidationFailed(summary_message(report, where), report)
