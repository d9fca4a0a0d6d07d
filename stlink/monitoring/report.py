"""A static HTML report per batch forecast, written atomically beside the table (``forecast.html``).

Sections (each a ``<section id=...>``, Plotly figures embedded with plotly.js inline, so the page
opens offline):

* ``map``: the sensors at their coordinates (or on a circle when the data has none), road edges as
  lines, coloured by the forecast value at step ``monitor.report_step`` (0 = the last step) of
  the latest issue time;
* ``fan``: for ``monitor.report_sensors`` sensors, the recent actuals (one day) and the forecast
  with its ``lower_<k>``/``upper_<k>`` bands;
* ``drift``: the drift summary (``drift/drift.json``) when there is one;
* ``accuracy``: the realised accuracy history (``monitor/history.parquet``) when there is one.
"""
from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlink.monitoring.drift import write_text_atomic
from stlink.monitoring.monitor import day_summary, interval_keys, read_latest_forecast

log = logging.getLogger(__name__)


def _fig_html(fig, first: bool) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False)


def sensor_layout(raw_dir: Path | None, sensor_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(sensor_id, x, y) positions (lon/lat when known, else a circle) and the edges (from, to)."""
    sensors = edges = None
    if raw_dir is not None and (Path(raw_dir) / "sensors.csv").is_file():
        sensors = pd.read_csv(Path(raw_dir) / "sensors.csv", dtype={"sensor_id": str})
        if (Path(raw_dir) / "edges.csv").is_file():
            edges = pd.read_csv(Path(raw_dir) / "edges.csv", dtype={"from": str, "to": str})
    if sensors is not None and {"lat", "lon"} <= set(sensors.columns) and sensors[["lat", "lon"]].notna().all().all():
        pos = sensors.set_index("sensor_id").reindex(sensor_ids)
        xy = pd.DataFrame({"sensor_id": sensor_ids, "x": pos["lon"].to_numpy(), "y": pos["lat"].to_numpy()})
    else:
        a = 2 * np.pi * np.arange(len(sensor_ids)) / max(1, len(sensor_ids))
        xy = pd.DataFrame({"sensor_id": sensor_ids, "x": np.cos(a), "y": np.sin(a)})
    return xy, edges


def recent_actuals(raw_dir: Path | None, sensors: list[str], channel: str, null_value: float, end: pd.Timestamp,
                   span: pd.Timedelta) -> pd.DataFrame:
    if raw_dir is None or not (Path(raw_dir) / "readings.parquet").is_file():
        return pd.DataFrame(columns=["sensor_id", "timestamp", "actual"])
    r = pd.read_parquet(Path(raw_dir) / "readings.parquet", columns=["timestamp", "sensor_id", channel])
    r["timestamp"] = pd.to_datetime(r["timestamp"])
    r = r[r["sensor_id"].astype(str).isin(sensors) & (r["timestamp"] > end - span)]
    v = r[channel].astype(float)
    return pd.DataFrame({"sensor_id": r["sensor_id"].astype(str), "timestamp": r["timestamp"],
                         "actual": v.where(v != null_value)})


def map_figure(fc: pd.DataFrame, xy: pd.DataFrame, edges: pd.DataFrame | None, step: int, unit: str):
    import plotly.graph_objects as go

    latest = fc[fc["issued_at"] == fc["issued_at"].max()]
    h = step if step > 0 else int(latest["horizon_step"].max())
    at = latest[latest["horizon_step"] == h].set_index("sensor_id")["value"]
    pos = xy.set_index("sensor_id")
    fig = go.Figure()
    if edges is not None and len(edges):
        ex, ey = [], []
        for a, b in zip(edges["from"], edges["to"]):
            if a in pos.index and b in pos.index:
                ex += [pos.at[a, "x"], pos.at[b, "x"], None]
                ey += [pos.at[a, "y"], pos.at[b, "y"], None]
        fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line={"color": "#bbbbbb", "width": 1},
                                 hoverinfo="skip", name="roads"))
    fig.add_trace(go.Scatter(
        x=xy["x"], y=xy["y"], mode="markers", text=xy["sensor_id"], name="sensors",
        marker={"size": 12, "color": at.reindex(xy["sensor_id"]).to_numpy(), "colorscale": "RdYlGn",
                "colorbar": {"title": unit}, "line": {"width": 1, "color": "#333"}},
        hovertemplate="%{text}: %{marker.color:.1f} " + unit + "<extra></extra>"))
    issued = latest["issued_at"].max()
    target = latest.loc[latest["horizon_step"] == h, "target_time"].max()
    fig.update_layout(title=f"forecast for {target} (step {h} of the forecast issued {issued})", height=520,
                      showlegend=False,
                      yaxis={"scaleanchor": "x"} if edges is not None else {})
    return fig


def fan_figure(fc: pd.DataFrame, actuals: pd.DataFrame, sensors: list[str], unit: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    latest = fc[fc["issued_at"] == fc["issued_at"].max()]
    keys = sorted(interval_keys(list(fc.columns)), key=float, reverse=True)
    fig = make_subplots(rows=len(sensors), cols=1, shared_xaxes=True, subplot_titles=sensors)
    for i, s in enumerate(sensors, start=1):
        f = latest[latest["sensor_id"] == s].sort_values("target_time")
        for j, k in enumerate(keys):
            fig.add_trace(go.Scatter(x=list(f["target_time"]) + list(f["target_time"][::-1]),
                                     y=list(f[f"upper_{k}"]) + list(f[f"lower_{k}"][::-1]), fill="toself",
                                     fillcolor=f"rgba(31,119,180,{0.15 + 0.15 * j})", line={"width": 0},
                                     name=f"{k}% interval", showlegend=i == 1, hoverinfo="skip"), i, 1)
        fig.add_trace(go.Scatter(x=f["target_time"], y=f["value"], mode="lines+markers", name="forecast",
                                 line={"color": "#1f77b4"}, showlegend=i == 1), i, 1)
        a = actuals[actuals["sensor_id"] == s].sort_values("timestamp")
        fig.add_trace(go.Scatter(x=a["timestamp"], y=a["actual"], mode="lines", name="actual",
                                 line={"color": "#333333"}, showlegend=i == 1), i, 1)
    fig.update_layout(height=250 * len(sensors), title=f"forecast and intervals ({unit}) with recent actuals")
    return fig


def accuracy_figure(history: pd.DataFrame, days: int):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    d = day_summary(history).sort_values("day").groupby("model_version").tail(days)
    cov = [c for c in d.columns if c.startswith("coverage_")]
    fig = make_subplots(rows=2 if cov else 1, cols=1, shared_xaxes=True,
                        subplot_titles=["realised MAE per day", *(["interval coverage per day"] if cov else [])])
    for v, g in d.groupby("model_version"):
        fig.add_trace(go.Scatter(x=g["day"], y=g["mae"], mode="lines+markers", name=f"{v} MAE"), 1, 1)
        if "reference_mae" in history.columns:
            ref = history[history["model_version"] == v]["reference_mae"].dropna()
            if len(ref):
                fig.add_hline(y=float(ref.iloc[0]), line_dash="dot", row=1, col=1)
        for c in cov:
            fig.add_trace(go.Scatter(x=g["day"], y=g[c], mode="lines+markers", name=f"{v} {c}"), 2, 1)
    fig.update_xaxes(type="category")                 # one point per day, however few days
    fig.update_layout(height=500)
    return fig


def build_report(params, forecast: Path, raw_dir: Path | None, drift: dict[str, Any] | None,
                 history: pd.DataFrame | None) -> str:
    """The report page as one HTML string.  It shows the latest issue time, and only that issue
    time's rows are read (``read_latest_forecast``), so a long backfill's table is never loaded whole."""
    fc, n_issued = read_latest_forecast(forecast)
    unit = params.data.units[0] if params.data.units else ""
    sensor_ids = sorted(fc["sensor_id"].unique())
    xy, edges = sensor_layout(raw_dir, sensor_ids)
    n = max(1, min(params.monitor.report_sensors, len(sensor_ids)))
    chosen = [sensor_ids[int(i)] for i in np.linspace(0, len(sensor_ids) - 1, n).round()]
    issued = fc["issued_at"].max()
    spd_span = pd.Timedelta(days=1)
    actuals = recent_actuals(raw_dir, chosen, params.data.channels[0], params.data.null_value,
                             fc["target_time"].max(), spd_span + (fc["target_time"].max() - issued))
    parts = [f"<h1 id='title'>{html.escape(params.data.dataset)}: forecast issued {issued}</h1>",
             f"<p id='summary'>{fc['sensor_id'].nunique()} sensors, {n_issued} issue time(s), "
             f"horizon {int(fc['horizon_step'].max())} steps, model {html.escape(str(fc['model_version'].iloc[0]))}; "
             f"intervals: {', '.join(k + '%' for k in interval_keys(list(fc.columns))) or 'none'}</p>",
             "<section id='map'><h2>Sensor map</h2>",
             _fig_html(map_figure(fc, xy, edges, params.monitor.report_step, unit), True), "</section>",
             "<section id='fan'><h2>Forecast with intervals</h2>",
             _fig_html(fan_figure(fc, actuals, chosen, unit), False), "</section>",
             "<section id='drift'><h2>Input drift</h2>"]
    if drift is None:
        parts.append("<p class='missing'>no drift summary for this forecast</p>")
    else:
        bad = [s for s in drift.get("sensors", []) if s.get("drifted")]
        parts.append(f"<p class='verdict'>{'DRIFT' if drift['drifted'] else 'no drift'}: {drift['n_drifted']} of "
                     f"{drift['n_sensors']} sensors (threshold {drift['threshold']:.0%}), window "
                     f"{drift['window']['start']} .. {drift['window']['end']}</p>")
        if bad:
            parts.append(pd.DataFrame(bad)[["sensor_id", "level_z", "ks_statistic", "missing_train",
                                            "missing_window"]].to_html(index=False, float_format=lambda x: f"{x:.3g}"))
    parts.append("</section><section id='accuracy'><h2>Realised accuracy</h2>")
    if history is None or history.empty:
        parts.append("<p class='missing'>no realised accuracy yet (run <code>stlink monitor</code> once actuals "
                     "arrive)</p>")
    else:
        parts.append(_fig_html(accuracy_figure(history, params.monitor.history_days), False))
    parts.append("</section>")
    title = f"{html.escape(params.data.dataset)} forecast {issued}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} "
            f"td,th{{padding:2px 8px}}</style></head><body>{''.join(parts)}</body></html>")


def report_step(params, forecast: str | Path | None = None, *, raw_dir: str | Path | None = None,
                drift: dict[str, Any] | None = None, log_mlflow: bool = True) -> Path:
    """Write ``<forecast>.html`` beside the forecast table (atomically); log it to MLflow and, inside a
    flow run, publish a Prefect link artifact.  ``drift``: this batch's drift summary (default: the
    last ``drift/drift.json``)."""
    forecast = Path(forecast or Path(params.report_dir) / f"forecast.{params.score.format}")
    raw_dir = Path(raw_dir or params.raw_dir)
    if drift is None and (Path(params.report_dir) / "drift" / "drift.json").is_file():
        drift = json.loads((Path(params.report_dir) / "drift" / "drift.json").read_text())
    hist_path = Path(params.report_dir) / "monitor" / "history.parquet"
    history = pd.read_parquet(hist_path) if hist_path.is_file() else None
    page = build_report(params, forecast, raw_dir if raw_dir.is_dir() else None, drift, history)
    out = forecast.with_suffix(".html")
    write_text_atomic(out, page)
    log.info("forecast report -> %s", out)
    if log_mlflow:
        try:
            log_report(params, out)
        except Exception as exc:  # noqa: BLE001 - the page is written; a tracking store down must not fail it
            log.warning("forecast report %s not logged to MLflow: %s", out, exc)
    _publish(out, params.data.dataset)
    return out


def log_report(params, page: Path) -> str:
    """An MLflow run ``forecast-report-<dataset>`` holding the page (artifact ``report/``)."""
    import mlflow

    from stlink.tracking import start_run, tracking_config

    with start_run(tracking_config(params), run_name=f"forecast-report-{params.data.dataset}",
                   tags={"stlink.kind": "forecast-report", "stlink.dataset": params.data.dataset}) as run:
        mlflow.log_artifact(str(page), "report")
        return run.info.run_id


def _publish(path: Path, dataset: str) -> None:
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    from prefect.artifacts import create_link_artifact

    create_link_artifact(link=Path(path).resolve().as_uri(), link_text=f"forecast report {dataset}",
                         key=f"forecast-report-{dataset}".lower().replace("_", "-"),
                         description="static HTML forecast report (map, fan chart, drift, realised accuracy)")
