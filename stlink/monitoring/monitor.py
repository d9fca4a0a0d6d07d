"""Realised accuracy: earlier forecast tables joined with the actual readings that arrived since.

``stlink monitor`` (``stlink.pipeline.monitor_step``):

1. every forecast table given (default: the scorer's ``reports/<dataset>/forecast.<fmt>``) is
   copied into the archive ``reports/<dataset>/monitor/forecasts/`` (one file per model version and
   issue-time range; a table already archived is not copied again): the scorer overwrites its
   output at each run, the archive keeps what was issued;
2. all archived forecasts are joined on (sensor_id, target_time) with the raw readings
   (``data/raw/<dataset>``; missing readings and the null value are masked);
3. per day of target time, model version and horizon step: masked MAE, count and the empirical
   coverage of each ``lower_<k>``/``upper_<k>`` interval;
4. these rows replace the same (day, model_version, horizon_step) rows of the history
   ``reports/<dataset>/monitor/history.parquet`` (others are kept), written atomically;
5. a day whose realised MAE exceeds ``(1 + monitor.mae_threshold)`` x the champion's test MAE is
   flagged (``flagged`` column, a warning, and ``reports/<dataset>/monitor/latest.json``);
6. an MLflow run ``monitor-<dataset>`` gets the figures of the days scored now.

No forecast overlapping an actual reading is an error (one line naming the forecast range and the
last reading) and writes no history.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from stlink.io import atomic_path, write_json
from stlink.monitoring import MonitoringError

log = logging.getLogger(__name__)
HISTORY_KEY = ["day", "model_version", "horizon_step"]
_LOWER = re.compile(r"^lower_(.+)$")


def monitor_dir(report_dir: Path) -> Path:
    return Path(report_dir) / "monitor"


# --- 1. the archive of issued forecasts ------------------------------------------------------------

def _existing_forecast(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MonitoringError(f"{path}: no forecast table; run `stlink forecast` first")
    return path


def _ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows with status ok (all of them when the table has no status column)."""
    return df[df["status"].fillna("ok") == "ok"] if "status" in df.columns else df


def read_forecast(path: str | Path) -> pd.DataFrame:
    path = _existing_forecast(path)
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"sensor_id": str})
    return _forecast_frame(df, path)


FORECAST_BLOCK_ROWS = 500_000  # CSV rows per block when a forecast table is streamed


def _forecast_blocks(path: Path, columns: list[str] | None = None):
    """The table in pieces: one Parquet row group (or ``FORECAST_BLOCK_ROWS`` CSV rows) at a time."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i, columns=cols).to_pandas()
    else:
        head = pd.read_csv(path, nrows=0).columns
        cols = None if columns is None else [c for c in columns if c in head]
        yield from pd.read_csv(path, usecols=cols, dtype={"sensor_id": str}, chunksize=FORECAST_BLOCK_ROWS)


def read_latest_forecast(path: str | Path) -> tuple[pd.DataFrame, int]:
    """The rows (status ok) of the latest issue time of a forecast table, and how many issue times
    the table holds, reading it one block at a time: a 30-day backfill is never loaded whole.

    Returns (rows of the latest issue time, number of issue times with an ok row)."""
    path = _existing_forecast(path)
    issued: set = set()
    for block in _forecast_blocks(path, ["issued_at", "status"]):           # pass 1: the issue times
        if "issued_at" not in block.columns:
            raise MonitoringError(f"{path}: not a forecast table, missing column(s) ['issued_at']")
        issued.update(pd.to_datetime(_ok_rows(block)["issued_at"]).unique())
    if not issued:
        raise MonitoringError(f"{path}: no forecast row with status ok to report")
    latest = max(issued)
    parts = []
    for block in _forecast_blocks(path):                                    # pass 2: its rows only
        block = _ok_rows(block[pd.to_datetime(block["issued_at"]) == latest])
        if len(block):
            parts.append(block)
    return _forecast_frame(pd.concat(parts, ignore_index=True), path), len(issued)


def _forecast_frame(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in ("sensor_id", "issued_at", "target_time", "horizon_step", "value") if c not in df.columns]
    if missing:
        raise MonitoringError(f"{path}: not a forecast table, missing column(s) {missing}")
    df["sensor_id"] = df["sensor_id"].astype(str)
    for c in ("issued_at", "target_time"):
        df[c] = pd.to_datetime(df[c])
    if "model_version" not in df.columns:
        df["model_version"] = path.name
    return df


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "model"


def archive_forecasts(paths: Sequence[str | Path], archive: Path) -> list[Path]:
    """Copy each forecast table into ``archive`` as Parquet named by model version and issue-time
    range (idempotent); returns the archived files written now."""
    written = []
    for path in paths:
        df = read_forecast(path)
        if df.empty:
            continue
        first, last = df["issued_at"].min(), df["issued_at"].max()
        name = (f"{_slug(df['model_version'].iloc[0])}_{first:%Y%m%dT%H%M}_{last:%Y%m%dT%H%M}.parquet")
        target = Path(archive) / name
        if target.exists():
            continue
        with atomic_path(target, ".parquet") as tmp:
            df.to_parquet(tmp, index=False)
        written.append(target)
    return written


def load_archive(archive: Path) -> pd.DataFrame:
    files = sorted(Path(archive).glob("*.parquet"))
    if not files:
        raise MonitoringError(f"{archive}: no archived forecasts; run `stlink forecast` then `stlink monitor`")
    df = pd.concat([read_forecast(f) for f in files], ignore_index=True)
    return df.drop_duplicates(["model_version", "sensor_id", "issued_at", "horizon_step"], keep="last")


# --- 2. actuals ------------------------------------------------------------------------------------

def actuals_from_raw(raw_dir: str | Path, channel: str, null_value: float) -> pd.DataFrame:
    """``sensor_id, target_time, actual`` from ``raw_dir/readings.parquet``; NaN where missing."""
    from stlink.data.formats import load_raw

    raw = load_raw(raw_dir)
    r = raw.readings
    if channel not in r.columns:
        raise MonitoringError(f"{raw_dir}: the readings have no channel {channel!r} (channels {raw.channels})")
    actual = r[channel].astype(np.float64)
    actual = actual.where(np.isfinite(actual) & (actual != null_value))
    return pd.DataFrame({"sensor_id": r["sensor_id"].astype(str), "target_time": pd.to_datetime(r["timestamp"]),
                         "actual": actual.to_numpy()})


def join_actuals(forecasts: pd.DataFrame, actuals: pd.DataFrame, where: str = "actuals") -> pd.DataFrame:
    """Forecast rows (status ok, value present) with an actual reading at their target time.

    Raises ``MonitoringError`` when no forecast target has a valid actual reading yet."""
    f = _ok_rows(forecasts)
    f = f[np.isfinite(f["value"].astype(np.float64))]
    joined = f.merge(actuals, on=["sensor_id", "target_time"], how="inner")
    joined = joined[np.isfinite(joined["actual"])]
    if joined.empty:
        last = actuals["target_time"].max() if len(actuals) else None
        raise MonitoringError(
            f"{where}: no actual reading overlaps the forecasts (targets {forecasts['target_time'].min()} .. "
            f"{forecasts['target_time'].max()}, readings end {last}); ingest newer readings first")
    return joined


# --- 3. per day ------------------------------------------------------------------------------------

def interval_keys(columns: Sequence[str]) -> list[str]:
    """["80", "95"] for columns lower_80, upper_80, lower_95, upper_95."""
    return [m.group(1) for c in columns if (m := _LOWER.match(c)) and f"upper_{m.group(1)}" in columns]


def daily_accuracy(joined: pd.DataFrame) -> pd.DataFrame:
    """Rows ``day, model_version, horizon_step, mae, count, n_issue_times, coverage_<k>...``."""
    j = joined.assign(day=joined["target_time"].dt.strftime("%Y-%m-%d"),
                      abs_err=(joined["value"].astype(np.float64) - joined["actual"]).abs())
    keys = interval_keys(list(j.columns))
    for k in keys:
        j[f"coverage_{k}"] = ((j["actual"] >= j[f"lower_{k}"]) & (j["actual"] <= j[f"upper_{k}"])).astype(np.float64)
    agg = {"mae": ("abs_err", "mean"), "count": ("abs_err", "size"), "n_issue_times": ("issued_at", "nunique")}
    agg.update({f"coverage_{k}": (f"coverage_{k}", "mean") for k in keys})
    out = j.groupby(HISTORY_KEY, as_index=False).agg(**agg)
    out["horizon_step"] = out["horizon_step"].astype(np.int32)
    out["count"] = out["count"].astype(np.int64)
    return out


def day_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (day, model_version): count-weighted MAE and coverages over the steps."""
    cov = [c for c in rows.columns if c.startswith("coverage_")]
    w = rows.assign(**{f"_{c}": rows[c] * rows["count"] for c in ["mae", *cov]})
    g = w.groupby(["day", "model_version"], as_index=False)[["count", *[f"_{c}" for c in ["mae", *cov]]]].sum()
    for c in ["mae", *cov]:
        g[c] = g.pop(f"_{c}") / g["count"]
    return g


# --- 4. history ------------------------------------------------------------------------------------

def update_history(path: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """Replace the (day, model_version, horizon_step) rows of ``rows`` in the Parquet history;
    written atomically; returns the whole history."""
    path = Path(path)
    if path.exists():
        old = pd.read_parquet(path)
        keep = ~old.set_index(HISTORY_KEY).index.isin(rows.set_index(HISTORY_KEY).index)
        rows = pd.concat([old[keep], rows], ignore_index=True)
    rows = rows.sort_values(HISTORY_KEY, ignore_index=True)
    with atomic_path(path, ".parquet") as tmp:
        rows.to_parquet(tmp, index=False)
    return rows


# --- 5. the champion's reference MAE ---------------------------------------------------------------

def reference_mae(params, model_version: str) -> float | None:
    """The test MAE of ``model_version`` (``stlink-<dataset>/<n>``) from its MLflow run
    (``test.model.mae``), else the project's ``metrics/test.json``; None when neither exists.
    A variant's rows (``stlink-<dataset>/<n>+int8``) compare with that variant's own gate MAE, the
    version's ``int8.test_mae`` tag."""
    if "/" in model_version:
        try:
            from mlflow.tracking import MlflowClient

            from stlink.tracking import configure, tracking_config, tracking_uri

            cfg = tracking_config(params)
            configure(cfg)
            client = MlflowClient(tracking_uri(cfg), tracking_uri(cfg))
            name, version = model_version.rsplit("/", 1)
            version, _, variant = version.partition("+")
            mv = client.get_model_version(name, version)
            mae = (mv.tags.get(f"{variant}.test_mae") if variant else
                   client.get_run(mv.run_id).data.metrics.get("test.model.mae"))
            if mae is not None:
                return float(mae)
        except Exception as exc:  # noqa: BLE001 - a store without that version: fall back to the file
            log.info("no MLflow test MAE for %s (%s); trying metrics/test.json", model_version, exc)
    path = Path(params.report_dir) / "metrics" / "test.json"
    if path.is_file():
        import json

        return float(json.loads(path.read_text())["model"]["mae"])
    return None


# --- the step --------------------------------------------------------------------------------------

def monitor(params, *, forecasts: Sequence[str | Path] | None = None, raw_dir: str | Path | None = None,
            out_dir: str | Path | None = None, log_mlflow: bool = True) -> dict[str, Any]:
    """Archive ``forecasts``, score every archived forecast against the readings of ``raw_dir``,
    update the history; returns the summary written to ``monitor/latest.json``."""
    out = Path(out_dir) if out_dir else monitor_dir(params.report_dir)
    raw_dir = Path(raw_dir or params.raw_dir)
    if forecasts is None:
        default = Path(params.report_dir) / f"forecast.{params.score.format}"
        forecasts = [default] if default.exists() else []
    archive_forecasts(list(forecasts), out / "forecasts")
    issued = load_archive(out / "forecasts")
    channel = params.data.channels[0]
    joined = join_actuals(issued, actuals_from_raw(raw_dir, channel, params.data.null_value),
                          where=f"{out / 'forecasts'} vs {raw_dir}")
    rows = daily_accuracy(joined)
    days = day_summary(rows)
    threshold = params.monitor.mae_threshold
    refs = {v: reference_mae(params, v) for v in days["model_version"].unique()}
    days["reference_mae"] = days["model_version"].map(refs).astype(np.float64)
    days["flagged"] = days["mae"] > (1.0 + threshold) * days["reference_mae"]
    rows = rows.merge(days[["day", "model_version", "reference_mae", "flagged"]], on=["day", "model_version"])
    history = update_history(out / "history.parquet", rows)
    summary = {
        "threshold": threshold, "forecasts_archived": int(issued[["model_version", "issued_at"]].drop_duplicates().shape[0]),
        "rows_scored": int(len(joined)), "history": str(out / "history.parquet"), "history_rows": int(len(history)),
        "days": days.to_dict(orient="records"),
        "flagged_days": days.loc[days["flagged"], "day"].tolist(),
        "by_step": rows.groupby("horizon_step").apply(
            lambda g: float(np.average(g["mae"], weights=g["count"])), include_groups=False).to_dict(),
    }
    for d in days.itertuples():
        if d.flagged:
            log.warning("realised MAE %.3f on %s (%s) is worse than the test MAE %.3f by more than %.0f%%",
                        d.mae, d.day, d.model_version, d.reference_mae, 100 * threshold)
    write_json(out / "latest.json", summary)
    if log_mlflow:
        summary["mlflow_run_id"] = log_monitor(params, rows, days, out / "history.parquet")
    return summary


def log_monitor(params, rows: pd.DataFrame, days: pd.DataFrame, history: Path) -> str:
    """One MLflow run ``monitor-<dataset>``: per day (step = days since the first), realised MAE,
    coverages and the flag; per horizon step the MAE over the days scored now; the history file."""
    import mlflow

    from stlink.tracking import start_run, tracking_config

    with start_run(tracking_config(params), run_name=f"monitor-{params.data.dataset}",
                   tags={"stlink.kind": "monitor", "stlink.dataset": params.data.dataset}) as run:
        first = pd.Timestamp(days["day"].min())
        for d in days.to_dict(orient="records"):
            step = (pd.Timestamp(d["day"]) - first).days
            metrics = {"realised.mae": d["mae"], "realised.count": d["count"], "realised.flagged": float(d["flagged"])}
            metrics.update({f"realised.{k}": v for k, v in d.items() if k.startswith("coverage_")})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}, step=step)
        for h, g in rows.groupby("horizon_step"):
            mlflow.log_metric("realised.mae_by_step", float(np.average(g["mae"], weights=g["count"])), step=int(h))
        mlflow.log_artifact(str(history), "monitor")
        return run.info.run_id
