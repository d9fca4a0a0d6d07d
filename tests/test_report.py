"""The static HTML forecast report (stlink.monitoring.report): structure without a browser, and in a
real headless Chromium when one is installed (skipped, with the reason, otherwise)."""
import base64
import dataclasses
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stlink.config import params_from_dict
from stlink.data.formats import save_raw
from stlink.data.synthetic import simulate
from stlink.monitoring import MonitoringError
from stlink.monitoring.monitor import daily_accuracy
from stlink.monitoring.report import report_step


class Elements(HTMLParser):
    """ids, tags and script sources of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.tags, self.script_src = set(), [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "script" and a.get("src"):
            self.script_src.append(a["src"])


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Raw readings of a small simulated network, a forecast with intervals issued at its last
    reading, a drift summary and a realised-accuracy history."""
    monkeypatch.chdir(tmp_path)
    params = params_from_dict({"data": {"dataset": "rep", "synthetic": {"n_corridors": 1, "sensors_per_corridor": 3,
                                                                        "days": 3}},
                               "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    raw = simulate(dataclasses.replace(params.data.synthetic))
    save_raw(raw, params.raw_dir)
    ids = raw.sensor_ids
    issued = pd.Timestamp(raw.readings["timestamp"].max())
    rows = []
    for s in ids:
        for h in range(1, 13):
            v = 55.0 + h
            rows.append({"sensor_id": s, "issued_at": issued, "target_time": issued + pd.Timedelta(minutes=5 * h),
                         "horizon_step": h, "value": v, "model_version": "stlink-rep/1", "status": "ok", "reason": None,
                         "lower_80": v - 2, "upper_80": v + 2, "lower_95": v - 4, "upper_95": v + 4})
    fc = pd.DataFrame(rows)
    out = Path(params.report_dir) / "forecast.parquet"
    out.parent.mkdir(parents=True)
    fc.to_parquet(out, index=False)
    joined = fc.assign(actual=fc["value"] + np.linspace(-3, 3, len(fc)))
    hist = daily_accuracy(joined).assign(reference_mae=1.0, flagged=False)
    (Path(params.report_dir) / "monitor").mkdir()
    hist.to_parquet(Path(params.report_dir) / "monitor" / "history.parquet", index=False)
    drift = {"drifted": True, "n_drifted": 1, "n_sensors": len(ids), "threshold": 0.3,
             "window": {"start": "a", "end": "b"},
             "sensors": [{"sensor_id": ids[0], "drifted": True, "level_z": -4.0, "ks_statistic": 0.6,
                          "missing_train": 0.0, "missing_window": 0.0}]}
    return tmp_path, params, out, drift, ids


def test_report_page_has_map_fan_drift_and_accuracy_and_is_self_contained(project):
    root, params, out, drift, ids = project
    page = report_step(params, out, drift=drift)
    assert page == out.with_suffix(".html") and page.is_file()
    assert not [p for p in page.parent.iterdir() if p.name.startswith(".")]          # no temp file left
    text = page.read_text()
    el = Elements()
    el.feed(text)
    assert {"title", "summary", "map", "fan", "drift", "accuracy"} <= el.ids
    assert el.script_src == []                                                         # plotly.js inline
    assert text.count("Plotly.newPlot") == 3                                           # map, fan chart, history
    assert "intervals: 80%, 95%" in text and "DRIFT: 1 of" in text and ids[0] in text
    # the map is coloured by the forecast of the last step: 55 + 12
    m = re.search(r'"marker":\{"color":\{"dtype":"f8","bdata":"([^"]+)"', text)      # plotly's typed array
    assert m and np.frombuffer(base64.b64decode(m.group(1)), "<f8").tolist() == [67.0] * len(ids)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(params.tracking.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("stlink").experiment_id])[0]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/forecast.html"]


def test_report_without_drift_or_history_says_so(project):
    root, params, out, drift, ids = project
    shutil.rmtree(Path(params.report_dir) / "monitor")
    text = report_step(params, out, log_mlflow=False).read_text()
    assert "no drift summary" in text and "no realised accuracy yet" in text
    assert text.count("Plotly.newPlot") == 2


def test_report_of_a_missing_forecast_fails_and_writes_nothing(project):
    root, params, out, drift, ids = project
    with pytest.raises(MonitoringError, match=r"nothing.parquet: no forecast table"):
        report_step(params, out.with_name("nothing.parquet"), log_mlflow=False)
    assert not out.with_name("nothing.html").exists()


def test_report_of_a_backfill_reads_the_latest_issue_time_one_row_group_at_a_time(project, monkeypatch):
    """A backfill table (several issue times, one Parquet row group each, a later issue time whose rows all
    failed): the report shows the latest issue time with ok rows and counts the issue times, and the table
    is read one row group at a time, never whole; a CSV table in blocks gives the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stlink.monitoring import monitor

    root, params, out, drift, ids = project
    last = pd.read_parquet(out)
    issued = last["issued_at"].iloc[0]
    older = [last.assign(issued_at=issued - pd.Timedelta(minutes=5 * k), value=last["value"] - 10 * k,
                         target_time=last["target_time"] - pd.Timedelta(minutes=5 * k)) for k in (3, 2, 1)]
    failed = last.assign(issued_at=issued + pd.Timedelta(minutes=5), status="no_forecast", value=np.nan)
    table = pd.concat([*older, last, failed], ignore_index=True)
    with pq.ParquetWriter(out, pa.Table.from_pandas(table, preserve_index=False).schema) as w:
        for part in (*older, last, failed):
            w.write_table(pa.Table.from_pandas(part.reset_index(drop=True), preserve_index=False))
    sizes = []
    real = pq.ParquetFile.read_row_group
    with monkeypatch.context() as mp:
        mp.setattr(pq.ParquetFile, "read_row_group",
                   lambda self, i, *a, **k: sizes.append(self.metadata.row_group(i).num_rows) or real(self, i, *a, **k))
        real_read = pd.read_parquet
        mp.setattr(pd, "read_parquet", lambda path, *a, **k: pytest.fail("the whole forecast table was read")
                   if Path(path).resolve() == out.resolve() else real_read(path, *a, **k))
        rows, n = monitor.read_latest_forecast(out)
        assert n == 4 and set(rows["issued_at"]) == {issued} and len(rows) == len(ids) * 12
        assert sizes and max(sizes) == len(ids) * 12                              # one row group at a time
        mp.setattr(monitor, "FORECAST_BLOCK_ROWS", 7)
        table.to_csv(out.with_suffix(".csv"), index=False)
        csv_rows, csv_n = monitor.read_latest_forecast(out.with_suffix(".csv"))
        mp.setattr(monitor, "FORECAST_BLOCK_ROWS", 500_000)
        text = report_step(params, out, drift=drift, log_mlflow=False).read_text()   # the page reads it the same way
    assert csv_n == 4 and len(csv_rows) == len(rows)
    np.testing.assert_allclose(csv_rows.sort_values(["sensor_id", "horizon_step"])["value"],
                               rows.sort_values(["sensor_id", "horizon_step"])["value"])
    assert f"{len(ids)} sensors, 4 issue time(s)" in text and f"forecast issued {issued}" in text
    m = re.search(r'"marker":\{"color":\{"dtype":"f8","bdata":"([^"]+)"', text)    # still the latest forecast
    assert m and np.frombuffer(base64.b64decode(m.group(1)), "<f8").tolist() == [67.0] * len(ids)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_report_loads_in_headless_chromium_without_console_errors(project):
    """Needs a browser: Debian's ``chromium`` (``apt-get install chromium``) and Playwright pointed at it."""
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); the page structure is tested above")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    root, params, out, drift, ids = project
    page_path = report_step(params, out, drift=drift, log_mlflow=False)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.resolve().as_uri())
        page.wait_for_selector("#map .plotly")
        assert page.locator(".js-plotly-plot").count() == 3
        browser.close()
    assert errors == []
