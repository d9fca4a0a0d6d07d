"""Input drift: the readings a batch forecast reads vs the training split the model learned from.

Per sensor, on the last ``drift.window_days`` of the input before the latest issue time:

* **level**: the window's mean vs the training mean, in training standard deviations
  (drifted when ``|z| > drift.level_sigma``);
* **spread**: the window's standard deviation / the training one (reported);
* **distribution**: two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) of the valid
  readings; drifted when ``p < drift.p_value`` *and* the statistic ``D > drift.ks_statistic``
  (traffic readings are autocorrelated, so the iid p-value alone fires on every busy day;
  the effect size keeps the false-alarm rate measured in docs/benchmarks.md low);
* **missing fraction**: drifted when the window's exceeds the training one by
  ``drift.missing_increase`` (an outage).

Globally: the Anderson-Darling k-sample test (``scipy.stats.anderson_ksamp``) on the readings of all
sensors standardised by their training mean and std.  The batch is *drifted* when the share of
drifted sensors reaches ``drift.threshold`` (or the global test rejects at ``drift.p_value`` with
``D > drift.ks_statistic``): a warning, and with ``drift.retrain_on_drift`` the batch-forecast flow
starts the nightly-retrain deployment.

Why scipy and not Evidently: Evidently 0.7.23 (the release pip resolves with this project's pins)
installs but fails to import under pandas 3.1 (``ImportError: cannot import name
'infer_dtype_from_object' from 'pandas.core.dtypes.common'``); its data-drift preset uses the same
KS / distance tests underneath.  See docs/method.md.

Outputs (``reports/<dataset>/drift/``): ``drift.json`` and ``drift.html`` (Plotly, self-contained),
written atomically; MLflow metrics on a ``drift-<dataset>`` run; a Prefect markdown artifact when
called inside a flow run.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlink.io import atomic_path, write_json
from stlink.monitoring import MonitoringError

log = logging.getLogger(__name__)


# --- inputs ----------------------------------------------------------------------------------------

def reference_from_processed(processed_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """(T_train, N) training readings of channel 0, NaN where missing, and the sensor ids."""
    from stlink.data.formats import load_processed

    processed_dir = Path(processed_dir)
    if not (processed_dir / "meta.json").is_file():
        raise MonitoringError(f"drift reference missing: {processed_dir} holds no processed dataset (the training "
                              f"split is the reference); run `stlink prepare` first")
    data = load_processed(processed_dir, mmap=True)
    a, b = data.meta["splits"]["train"]
    ref = np.where(data.mask[a:b], data.values[a:b, :, 0], np.nan).astype(np.float64)       # (T, N)
    return ref, [str(s) for s in data.sensor_ids]


def current_window(input: str | Path, steps: int, null_value: float, channel: str | None = None
                   ) -> tuple[np.ndarray, list[str], pd.DatetimeIndex]:
    """(W, N) the last ``steps`` readings of ``input`` (a processed or a raw readings folder), NaN
    where missing; the sensor ids and timestamps."""
    from stlink.data.formats import load_processed, load_raw

    input = Path(input)
    if (input / "meta.json").is_file():
        d = load_processed(input, mmap=True)
        v = np.where(d.mask[-steps:], d.values[-steps:, :, 0], np.nan).astype(np.float64)
        return v, [str(s) for s in d.sensor_ids], pd.DatetimeIndex(d.timestamps[-steps:])
    if (input / "readings.parquet").is_file():
        raw = load_raw(input)
        ch = channel or raw.channels[0]
        wide = raw.readings.pivot_table(index="timestamp", columns="sensor_id", values=ch, aggfunc="first")
        wide = wide.reindex(columns=raw.sensor_ids).sort_index().iloc[-steps:]
        v = wide.to_numpy(np.float64)
        v = np.where(np.isfinite(v) & (v != null_value), v, np.nan)
        return v, [str(s) for s in wide.columns], pd.DatetimeIndex(wide.index)
    raise MonitoringError(f"{input}: neither a processed dataset (meta.json) nor raw readings (readings.parquet)")


# --- the tests -------------------------------------------------------------------------------------

def sensor_drift(ref: np.ndarray, cur: np.ndarray, sensor_ids: list[str], cfg) -> pd.DataFrame:
    """One row per sensor: level z, spread ratio, KS statistic and p-value, missing fractions, flags.

    ref: (T, N), cur: (W, N) readings with NaN where missing."""
    from scipy.stats import ks_2samp

    rows = []
    for n, sid in enumerate(sensor_ids):
        r, c = ref[:, n][np.isfinite(ref[:, n])], cur[:, n][np.isfinite(cur[:, n])]
        miss_ref, miss_cur = float(np.mean(~np.isfinite(ref[:, n]))), float(np.mean(~np.isfinite(cur[:, n])))
        row = {"sensor_id": sid, "missing_train": miss_ref, "missing_window": miss_cur, "n_window": int(len(c))}
        if len(r) > 1 and len(c) > 1:
            sd = float(np.std(r)) or 1.0
            test = ks_2samp(r, c)
            row.update(level_z=float((np.mean(c) - np.mean(r)) / sd), spread_ratio=float(np.std(c) / sd),
                       ks_statistic=float(test.statistic), ks_pvalue=float(test.pvalue))
        else:
            row.update(level_z=np.nan, spread_ratio=np.nan, ks_statistic=np.nan, ks_pvalue=np.nan)
        row["level_drift"] = bool(abs(row["level_z"]) > cfg.level_sigma) if np.isfinite(row["level_z"]) else False
        row["distribution_drift"] = bool(row["ks_pvalue"] < cfg.p_value and row["ks_statistic"] > cfg.ks_statistic) \
            if np.isfinite(row["ks_pvalue"]) else False
        row["missing_drift"] = bool(miss_cur - miss_ref > cfg.missing_increase)
        row["drifted"] = row["level_drift"] or row["distribution_drift"] or row["missing_drift"]
        rows.append(row)
    return pd.DataFrame(rows)


def global_drift(ref: np.ndarray, cur: np.ndarray, cfg) -> dict[str, Any]:
    """Anderson-Darling k-sample test and KS on all readings standardised per sensor by training."""
    from scipy.stats import anderson_ksamp, ks_2samp

    mu, sd = np.nanmean(ref, axis=0), np.nanstd(ref, axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    r, c = ((ref - mu) / sd).ravel(), ((cur - mu) / sd).ravel()
    r, c = r[np.isfinite(r)], c[np.isfinite(c)]
    if len(c) < 2:
        return {"test": "anderson_ksamp", "statistic": None, "pvalue": None, "ks_statistic": None, "drifted": True,
                "reason": "no valid reading in the window"}
    with warnings.catch_warnings():                   # p-value capped to [0.001, 0.25] by scipy's table
        warnings.simplefilter("ignore", UserWarning)
        ad = anderson_ksamp([r, c], method=None)
    ks = ks_2samp(r, c)
    drifted = bool(ad.pvalue < cfg.p_value and ks.statistic > cfg.ks_statistic)
    return {"test": "anderson_ksamp", "statistic": float(ad.statistic), "pvalue": float(ad.pvalue),
            "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue), "drifted": drifted}


def detect_drift(ref: np.ndarray, ref_ids: list[str], cur: np.ndarray, cur_ids: list[str], cfg,
                 window: pd.DatetimeIndex | None = None) -> dict[str, Any]:
    """The drift summary of ``cur`` against ``ref`` (sensors matched by id)."""
    missing = [s for s in ref_ids if s not in cur_ids]
    if missing:
        raise MonitoringError(f"drift: sensor(s) {missing[:5]} of the training reference are not in the input")
    cur = cur[:, pd.Index(cur_ids).get_indexer(ref_ids)]
    per_sensor = sensor_drift(ref, cur, ref_ids, cfg)
    glob = global_drift(ref, cur, cfg)
    share = float(per_sensor["drifted"].mean())
    drifted = bool(share >= cfg.threshold or glob["drifted"])
    return {
        "drifted": drifted, "share_drifted": share, "threshold": cfg.threshold,
        "n_sensors": len(ref_ids), "n_drifted": int(per_sensor["drifted"].sum()),
        "drifted_sensors": per_sensor.loc[per_sensor["drifted"], "sensor_id"].tolist(),
        "window": {"start": str(window[0]) if window is not None and len(window) else None,
                   "end": str(window[-1]) if window is not None and len(window) else None,
                   "steps": int(cur.shape[0])},
        "global": glob,
        "settings": {k: getattr(cfg, k) for k in ("p_value", "ks_statistic", "level_sigma", "missing_increase",
                                                   "window_days")},
        "sensors": per_sensor.replace({np.nan: None}).to_dict(orient="records"),
    }


# --- the report ------------------------------------------------------------------------------------

def drift_html(summary: dict[str, Any], title: str) -> str:
    """A self-contained HTML page: verdict, KS statistic and level z per sensor, the table."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = pd.DataFrame(summary["sensors"])
    colour = np.where(df["drifted"], "#d62728", "#1f77b4")
    fig = make_subplots(rows=2, cols=1, subplot_titles=("KS statistic per sensor (window vs training)",
                                                        "level shift per sensor (training standard deviations)"))
    fig.add_trace(go.Bar(x=df["sensor_id"], y=df["ks_statistic"], marker_color=colour, name="KS D"), 1, 1)
    fig.add_trace(go.Bar(x=df["sensor_id"], y=df["level_z"], marker_color=colour, name="level z"), 2, 1)
    fig.update_layout(height=600, showlegend=False, title=title)
    verdict = "DRIFT" if summary["drifted"] else "no drift"
    table = df[["sensor_id", "level_z", "spread_ratio", "ks_statistic", "ks_pvalue", "missing_train",
                "missing_window", "drifted"]].to_html(index=False, float_format=lambda x: f"{x:.3g}", border=0)
    body = fig.to_html(full_html=False, include_plotlyjs=True)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1 id='drift-verdict'>{verdict}: {summary['n_drifted']} of {summary['n_sensors']} sensors drifted "
            f"(threshold {summary['threshold']:.0%})</h1><p>window {summary['window']['start']} .. "
            f"{summary['window']['end']}; global Anderson-Darling p = {summary['global'].get('pvalue')}</p>"
            f"{body}<div id='drift-table'>{table}</div></body></html>")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path, path.suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Input drift: {'DRIFT' if summary['drifted'] else 'no drift'}", "",
             f"{summary['n_drifted']} of {summary['n_sensors']} sensors drifted (threshold "
             f"{summary['threshold']:.0%}); window {summary['window']['start']} .. {summary['window']['end']}", "",
             "| sensor | level z | KS D | missing (train -> window) |", "|---|---|---|---|"]
    for s in summary["sensors"]:
        if s["drifted"]:
            lines.append(f"| {s['sensor_id']} | {s['level_z']} | {s['ks_statistic']} | "
                         f"{s['missing_train']:.2f} -> {s['missing_window']:.2f} |")
    return "\n".join(lines)


def publish(summary: dict[str, Any], dataset: str) -> None:
    """A Prefect markdown artifact ``drift-<dataset>`` when running inside a flow run."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown(summary), key=f"drift-{dataset}".lower().replace("_", "-"),
                             description="input drift of the batch forecast")


def log_drift(params, summary: dict[str, Any]) -> str:
    import mlflow

    from stlink.tracking import start_run, tracking_config

    with start_run(tracking_config(params), run_name=f"drift-{params.data.dataset}",
                   tags={"stlink.kind": "drift", "stlink.dataset": params.data.dataset}) as run:
        g = summary["global"]
        metrics = {"drift.share_drifted": summary["share_drifted"], "drift.drifted": float(summary["drifted"]),
                   "drift.global_statistic": g.get("statistic"), "drift.global_pvalue": g.get("pvalue"),
                   "drift.global_ks": g.get("ks_statistic")}
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        for i, s in enumerate(summary["sensors"]):
            if s["ks_statistic"] is not None:
                mlflow.log_metric("drift.sensor_ks", s["ks_statistic"], step=i)
        return run.info.run_id


def drift_step(params, input: str | Path | None = None, out_dir: str | Path | None = None, *,
               log_mlflow: bool = True) -> dict[str, Any]:
    """Compare the last ``drift.window_days`` of ``input`` (default ``data/processed/<dataset>``) with
    the training split of ``data/processed/<dataset>``; write ``drift.json`` / ``drift.html``; warn."""
    ref, ref_ids = reference_from_processed(params.processed_dir)
    from stlink.data.formats import load_processed

    spd = load_processed(params.processed_dir, mmap=True).steps_per_day
    steps = max(2, int(round(params.drift.window_days * spd)))
    cur, cur_ids, times = current_window(input or params.processed_dir, steps, params.data.null_value,
                                         params.data.channels[0])
    summary = detect_drift(ref, ref_ids, cur, cur_ids, params.drift, times)
    out = Path(out_dir) if out_dir else Path(params.report_dir) / "drift"
    write_json(out / "drift.json", summary)
    write_text_atomic(out / "drift.html", drift_html(summary, f"{params.data.dataset}: input drift"))
    summary["paths"] = {"json": str(out / "drift.json"), "html": str(out / "drift.html")}
    if summary["drifted"]:
        log.warning("input drift: %d of %d sensors drifted (%s) in %s .. %s; global AD p = %s",
                    summary["n_drifted"], summary["n_sensors"], ", ".join(summary["drifted_sensors"][:5]),
                    summary["window"]["start"], summary["window"]["end"], summary["global"].get("pvalue"))
    if log_mlflow:
        try:
            summary["mlflow_run_id"] = log_drift(params, summary)
        except Exception as exc:  # noqa: BLE001 - the files are written; a tracking store down must not fail it
            log.warning("drift not logged to MLflow: %s", exc)
    publish(summary, params.data.dataset)
    return summary


def trigger_retrain(params, summary: dict[str, Any]) -> str | None:
    """Start the retrain deployment (``drift.retrain_deployment``) when ``summary`` is drifted and
    ``drift.retrain_on_drift`` is on; returns the new flow run's id (None: not triggered).

    Called by the ``batch-forecast`` flow after the drift check: the flow itself triggers the
    retrain (no Prefect automation needed, so it works on the ephemeral API too); the run goes to
    the deployment's runner (``flows.serve``), which shares its one-at-a-time concurrency limit."""
    if not (summary.get("drifted") and params.drift.retrain_on_drift):
        return None
    from prefect.deployments import run_deployment

    run = run_deployment(params.drift.retrain_deployment, timeout=0,
                         tags=["drift"], idempotency_key=f"drift-{summary['window']['end']}")
    log.warning("input drift: started %s (flow run %s)", params.drift.retrain_deployment, run.id)
    return str(run.id)


def drift_check(params, input: str | Path | None = None, *, log_mlflow: bool = True) -> dict[str, Any]:
    """The batch-forecast flow's drift step: ``drift_step`` then ``trigger_retrain``."""
    summary = drift_step(params, input, log_mlflow=log_mlflow)
    summary["retrain_flow_run"] = trigger_retrain(params, summary)
    return summary
